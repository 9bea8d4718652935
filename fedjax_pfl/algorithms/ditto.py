"""Ditto: a FedAvg global model plus personal models pulled towards it.

Reference:
  Li, Hu, Beirami, Smith, "Ditto: Fair and Robust Federated Learning Through
  Personalization", ICML 2021 (arXiv 2012.04221), Algorithm 1.

Each cohort client (1) trains a copy of the received global model w^t on its
data exactly as in FedAvg, and (2) updates its personal model v_i for s local
steps (by default as many as the global copy takes) on
f_i(v) + lambda/2 ||v - w^t||^2, i.e.
v <- v - eta_p (grad f_i(v) + lambda (v - w^t)). The server averages the global
copies (n_i-weighted); personal models never leave the client and are stacked
[M, ...] in the state. Evaluation tests each client's personal model.

Paper symbol -> argument: lambda -> `lam`, eta -> `client_lr` (global copy),
personal step size -> `personal_lr` (default: `client_lr`), s local personal
iterations -> `personal_steps` / `personal_epochs` (default: the global copy's
schedule, `local_steps` / `local_epochs`), |batch| -> `batch_size` (both
updates). The personal minibatch order uses the key `fold_in(client_key, 1)`;
the global copy uses the client key itself, so the global model follows FedAvg
exactly. All personal models start at the global init.

Paper vs released code on the personal schedule: Algorithm 1 of the paper
gives the personal solver its own count, "s local iterations", separate from
the global solver's local updates. The released code (github.com/litian96/ditto,
flearn/trainers_MTL/ditto.py) runs ONE loop of `local_iters` minibatches in
which each batch first takes a personal SGD step and then a global SGD step,
both with `learning_rate`: s equals the global model's local steps and the two
updates share their minibatches. The default here (personal schedule = the
local schedule, personal_lr = client_lr) is that count; `personal_steps` or
`personal_epochs` gives the paper's separate s. The minibatches are never
shared (each model has its own order, see above).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import optax
from flax import struct

from fedjax_pfl.core import aggregation, algorithm, config, local, server
from fedjax_pfl.core import execution as ex
from fedjax_pfl.core import round as round_lib
from fedjax_pfl.core.algorithm import FederatedAlgorithm
from fedjax_pfl.models.model import Model


@struct.dataclass
class DittoState:
    """Ditto's round, global model (`params`) with its server `opt_state`, the
    stacked personal models (`client_params`, leaves [M, ...]); `hparams`:
    client_lr, server_lr, lam, personal_lr."""

    round: jax.Array
    params: object
    opt_state: object
    client_params: object
    hparams: dict


@dataclasses.dataclass(frozen=True, kw_only=True)
class DittoConfig(config.ServerConfig):
    """Ditto's hyperparameters (`config.ServerConfig`'s, and):

    Attributes:
      lam: lambda, the pull of personal models towards the global one (traced).
      personal_lr: the personal models' lr (traced; None: `client_lr`).
      personal_steps, personal_epochs: s, the personal model's local schedule
        in minibatch steps or in epochs (static; set at most one). None for
        both: the global copy's schedule (`local_steps` / `local_epochs`).
    """

    lam: float = config.number(0.1)
    personal_lr: float | None = config.number(None, optional=True)
    personal_steps: int | None = config.integer(None, optional=True)
    personal_epochs: int | None = config.integer(None, optional=True)

    def check(self):
        if self.personal_steps is not None and self.personal_epochs is not None:
            raise ValueError(f"personal_steps / personal_epochs: set at most one, got "
                             f"personal_steps={self.personal_steps!r}, "
                             f"personal_epochs={self.personal_epochs!r}.")
        super().check()

    def hparams(self) -> dict:
        hp = super().hparams()
        # a separate buffer: state leaves that share one cannot both be donated
        return {**hp, "personal_lr": jnp.array(hp["client_lr"])} if self.personal_lr is None else hp

    @functools.cached_property
    def personal_schedule(self) -> local.LocalSchedule:
        """The personal model's schedule (the local one unless personal_* is set)."""
        if self.personal_steps is None and self.personal_epochs is None:
            return self.schedule
        return dataclasses.replace(self.schedule, local_steps=self.personal_steps,
                                   local_epochs=self.personal_epochs)


@config.factory(DittoConfig)
def ditto(model: Model, cfg: DittoConfig) -> FederatedAlgorithm:
    """Ditto; hyperparameters: `DittoConfig`."""
    loss_fn = local.model_loss_fn(model)

    def init(key, train, params=None):
        params, hp, opt_state = server.init(model, cfg, key, train, params)
        return DittoState(jnp.zeros((), jnp.int32), params, opt_state,
                          round_lib.replicate(params, train.num_clients), hp)

    def client_update(broadcast, x):
        params, hp = broadcast
        data, key, weight, personal = x
        result = cfg.schedule.train(loss_fn, params, data, key, hp["client_lr"])
        penalty = lambda v: 0.5 * hp["lam"] * optax.tree.norm(optax.tree.sub(v, params),
                                                              squared=True)
        personal = cfg.personal_schedule.train(loss_fn, personal, data, jax.random.fold_in(key, 1),
                                               hp["personal_lr"], penalty).params
        y = (result.mean_loss(), personal)
        return y, aggregation.weighted_delta(result.params, params, weight)

    def round_fn(state, train, key, cohort=None):
        cohort, data, keys, n = round_lib.start(
            key, train, cfg.clients_per_round, cohort,
            state_clients=round_lib.num_clients_of(state.client_params))
        (losses, personal), (delta_sum, weight_sum) = ex.map_reduce(
            client_update, (state.params, state.hparams),
            (data, keys, n, cohort.take(state.client_params)), cfg.strategy)
        params, opt_state = server.step(cfg, state, delta_sum, weight_sum)
        metrics = {"train_loss": round_lib.mean_loss(losses, n)}
        return state.replace(round=state.round + 1, params=params, opt_state=opt_state,
                             client_params=cohort.put(state.client_params, personal)), metrics

    def evaluate(state, train, test):
        algorithm.check_same_clients(train.num_clients, test, "test")
        return server.evaluate_personal(model, state.client_params, test, cfg.strategy)

    return FederatedAlgorithm(init, round_fn, evaluate)
