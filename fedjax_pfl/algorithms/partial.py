"""Stateful partial model personalization: FedAlt, FedSim, FedRep and FedPer.

References:
  Pillutla, Malik, Mohamed, Rabbat, Sanjabi, Xiao, "Federated Learning with
  Partial Model Personalization", ICML 2022 (arXiv:2204.03809): Algorithm 1
  (FedAlt) and Algorithm 2 (FedSim).
  Collins, Hassani, Mokhtari, Shakkottai, "Exploiting Shared Representations
  for Personalized Federated Learning", ICML 2021 (FedRep).
  Arivazhagan, Aggarwal, Singh, Choudhary, "Federated Learning with
  Personalization Layers", arXiv:1912.00818, 2019 (FedPer).

The params of one model are split by `core.params.partition` into a personal
block v (kept per client, stacked [M, ...]) and a shared block u (one server
copy); ONE client's training is `core.partial.ClientTrainer`. One build,
`partial_pfl`, four registry entries:
* mode "alternating" (FedAlt): client i first updates v_i with u frozen (τ_v
  steps), then a local copy u_i, from u, with v_i frozen (τ_u steps).
  FedRep is FedAlt with `personal` = the head (the paper: many head epochs).
* mode "simultaneous" (FedSim): every step takes the gradient of the same
  minibatch loss with respect to both blocks. FedPer is FedSim with
  `personal` = the head (its "personalization layers").
The server sets u to the cohort's weighted mean of u_i; v_i stays on the client.

Paper symbol -> argument: V (personal block; FedRep's h_i, FedPer's
personalization layers) -> `personal` (labels, see `core.params`; default
the head; the old `head=` of FedRep / FedPer is accepted with a
DeprecationWarning), u (FedRep's φ) -> `state.shared`, τ_v -> `personal_steps`
/ `personal_epochs` (alternating only; default: the shared phase's schedule),
τ_u (or FedSim's τ) -> `local_steps` / `local_epochs`, γ -> `client_lr`, S ->
`clients_per_round`, aggregation weights -> `weighting` ("num_examples" or
"uniform"). Evaluation: every client's (v_i, u). Round metrics: `train_loss`
(shared or joint phase) and `drift`, the cohort mean of Σ_tensors ‖u_i − u‖_F.

Within a round, the personal phase uses the key `fold_in(client_key, 0)` and
the shared (or joint) phase `fold_in(client_key, 1)`, so alternating methods
that differ only in their penalties draw the same minibatches (see `core.partial`).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable

import jax.numpy as jnp

from fedjax_pfl.core import aggregation, algorithm, config
from fedjax_pfl.core import partial as partial_lib
from fedjax_pfl.core import round as round_lib
from fedjax_pfl.core.algorithm import FederatedAlgorithm
from fedjax_pfl.models.model import Model

PartialState = partial_lib.PersonalState  # FedAlt / FedSim / FedRep / FedPer


@dataclasses.dataclass(frozen=True, kw_only=True)
class PartialConfig(partial_lib.PersonalConfig):
    """Hyperparameters of FedAlt / FedSim / FedRep / FedPer (`PersonalConfig`'s, and):

    Attributes:
      mode: "alternating" (FedAlt, FedRep) or "simultaneous" (FedSim, FedPer).
      personal_steps, personal_epochs: the personal phase's schedule
        (alternating only; default: the shared phase's).
    """

    mode: str = config.choice("alternating", ("alternating", "simultaneous"))
    personal_steps: int | None = config.integer(None, optional=True)
    personal_epochs: int | None = config.integer(None, optional=True)

    def check(self):
        if self.mode == "simultaneous":
            algorithm.check_arg("personal_steps", (self.personal_steps, self.personal_epochs),
                                self.personal_steps is None and self.personal_epochs is None,
                                "None for mode 'simultaneous' (both blocks share the schedule)")
        self.personal_schedule  # noqa: B018 - validates it
        super().check()

    @functools.cached_property
    def personal_schedule(self):
        return partial_lib.personal_schedule(self.schedule, self.personal_steps,
                                             self.personal_epochs)


@config.factory(PartialConfig)
def partial_pfl(model: Model, cfg: PartialConfig) -> FederatedAlgorithm:
    """Stateful partial personalization; hyperparameters: `PartialConfig`."""
    part = partial_lib.model_partition(model, cfg.personal)
    trainer = partial_lib.ClientTrainer(model, part, cfg.schedule, cfg.personal_schedule)

    def init(key, train, params=None):
        algorithm.check_data(model, train, cfg.clients_per_round)
        v, u = part.split(algorithm.initial_params(model, key, params))
        return PartialState(jnp.zeros((), jnp.int32), u, round_lib.replicate(v, train.num_clients),
                            cfg.hparams())

    def client_update(broadcast, x):
        u, hp = broadcast
        v, data, key, weight = x
        if cfg.mode == "alternating":
            v, _ = trainer.personal(v, u, data, key, hp["client_lr"])
            u_i, loss = trainer.shared(v, u, data, key, hp["client_lr"])
        else:
            v, u_i, loss = trainer.joint(v, u, data, key, hp["client_lr"])
        return (v, loss, partial_lib.drift_norm(u_i, u)), aggregation.weighted_delta(u_i, u, weight)

    def round_fn(state, train, key, cohort=None):
        shared, personal, (losses, drift), n = partial_lib.averaged_round(
            cfg, client_update, (state.shared, state.hparams), state.client_personal, train, key,
            cohort)
        metrics = {"train_loss": round_lib.mean_loss(losses, n),
                   "drift": round_lib.mean_loss(drift, (n > 0).astype(jnp.float32))}
        return state.replace(round=state.round + 1, shared=shared,
                             client_personal=personal), metrics

    def evaluate(state, train, test):
        del train
        return trainer.evaluate(state.shared, test, state.client_personal, cfg.strategy)

    return FederatedAlgorithm(init, round_fn, evaluate)


def _entry(name: str, doc: str, mode: str, **options) -> Callable:
    """A registry entry of `partial_pfl` with its `mode` fixed."""
    fixed = {"mode": mode}
    if mode == "simultaneous":
        fixed.update(personal_steps=None, personal_epochs=None)
    make = config.factory(PartialConfig, fixed=fixed, **options)(partial_pfl.build)
    make.__name__ = make.__qualname__ = name
    make.__doc__ = doc + " Hyperparameters: `PartialConfig` (module docstring)."
    return make


fedalt = _entry("fedalt", "FedAlt: personal block, then the shared one.", "alternating")
fedsim = _entry("fedsim", "FedSim: personal and shared blocks on the same steps.", "simultaneous")
fedrep = _entry("fedrep", "FedRep: personal head first, then the shared body.", "alternating",
                aliases={"head": "personal"})
fedper = _entry("fedper", "FedPer: personal head and shared base trained jointly.",
                "simultaneous", aliases={"head": "personal"})
