"""FedAPM: federated learning via ADMM with partial model personalization.

Reference:
  Zhu, Nie, Zeng, Wang, Sun, Yao, Chen, Xu, Yang, "FedAPM: Federated Learning
  via ADMM with Partial Model Personalization", arXiv:2506.04672 (2025).
  Released code: github.com/NieFeiteng/FedAPM (the numeric defaults follow it;
  `personal` does not, see below).

Consensus problem min Σ_i α_i f_i(v_i, u_i) s.t. u_i = u, with the per-client
augmented Lagrangian α_i f_i(v_i, u_i) + ⟨π_i, u_i − u⟩ + ρ/2 ‖u_i − u‖².
One round, for each cohort client i (in the code's order):

1. reset the shared block to the server's u;
2. personal phase, E epochs of SGD on α_i (f_i + wd/2 ‖v‖²) + σ/2 ‖v − v_i‖²;
3. shared phase, E epochs of SGD from u on
   α_i (f_i + wd/2 ‖u_i‖²) + ⟨π_i, u_i − u⟩ + ρ/2 ‖u_i − u‖²;
4. dual ascent π_i ← π_i + ρ (u_i − u);

then the server sets u = mean_i (u_i + π_i / ρ) over ALL clients holding data,
with the stale (u_i, π_i) of clients outside the cohort (π_i/ρ is taken as 0
when ρ = 0, where the dual is inert). Per-client state [M]: v_i, u_i, π_i
(shared shape only), i.e. (|v| + 2|u|)·4 bytes per client in float32.

Paper symbol -> argument: v_i -> `personal` (labels, see `core.params`),
ρ -> `rho` (0.01), σ_i -> `sigma` (0.01, hard-coded in the code), μ (weight
decay inside f_i) -> `weight_decay` (0.01), α_i -> `client_weight` ("uniform":
α_i = 1/M as in the code, so the data step is lr/M; "unit": α_i = 1), E ->
`local_epochs` (per phase; or `local_steps`), B -> `batch_size`, lr ->
`client_lr`, |S^k| -> `clients_per_round`.

Where the code and a cleaner reading differ (flags, code default first):
* `server_average`: "all" (code: every client's stale u_i + π_i/ρ) or
  "cohort" (the cohort's only). Clients with no training data are left out
  of both, and of M in α_i = 1/M (padding clients change nothing).
* `evaluation`: "local" (code: each client's (v_i, u_i) after its last
  update, so the initial model for clients never sampled) or "global"
  (every client's (v_i, u)).
* The code's duals also cover the personal keys, where they are inert; here
  π_i has the shared shape only. The CIFAR-10 slice swap of the code (its Q1)
  is not reproduced: the shared block is reset to u every round.
Round metrics: `train_loss` (shared phase) and `drift`, the cohort mean of
Σ_tensors ‖u_i − u‖_F (the paper's client-drift bar chart).

Implementation (the ADMM steps, their cost choices): `core.admm`.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import optax
from flax import struct

from fedjax_pfl.core import admm, algorithm, config, local, partial
from fedjax_pfl.core import execution as ex
from fedjax_pfl.core import params as params_lib
from fedjax_pfl.core import round as round_lib
from fedjax_pfl.core.algorithm import FederatedAlgorithm
from fedjax_pfl.models.model import Model


@struct.dataclass
class FedAPMState:
    """State of FedAPM: round (int32 scalar), the server's shared block u
    (`shared`, flat dict {path: leaf}), per-client rows [M, ...] v_i
    (`client_personal`), u_i (`client_shared`, the last local shared copy) and
    π_i (`client_dual`, shared shapes), and `hparams` (traced: client_lr, rho,
    sigma, weight_decay)."""

    round: jax.Array
    shared: dict
    client_personal: dict
    client_shared: dict
    client_dual: dict
    hparams: dict


@dataclasses.dataclass(frozen=True, kw_only=True)
class FedAPMConfig(config.Config):
    """FedAPM's hyperparameters (`config.Config`'s; batch_size 50, client_lr 0.1), and:

    Attributes:
      personal: which params are personal (`core.params` labels); the rest is
        shared. The default `("head",)` is this library's choice; the released
        code's multimodal experiments use `personal=fp.models.ENCODERS`.
      rho, sigma, weight_decay (traced), client_weight, server_average,
        evaluation: see the module docstring.
      diagnostics: add `metrics["diagnostics"]`: "clients", "drift" ‖u_i − u‖
        and "dual_norm" ‖π_i‖ after the round, each [S].
    The schedule (at most one of `local_steps` / `local_epochs`) is EACH
    phase's; neither: 3 epochs, as the code.
    """

    batch_size: int = 50
    client_lr: float = config.number(0.1)
    personal: params_lib.Label = ("head",)
    rho: float = config.number(0.01)
    sigma: float = config.number(0.01)
    weight_decay: float = config.number(0.01)
    client_weight: str = config.choice("uniform", ("uniform", "unit"))
    server_average: str = config.choice("all", ("all", "cohort"))
    evaluation: str = config.choice("local", ("local", "global"))
    diagnostics: bool = config.flag(False)

    @functools.cached_property
    def schedule(self) -> local.LocalSchedule:
        default = self.local_steps is None and self.local_epochs is None
        return local.LocalSchedule(self.batch_size, self.local_steps,
                                   3 if default else self.local_epochs, self.client_optimizer)


@config.factory(FedAPMConfig)
def fedapm(model: Model, cfg: FedAPMConfig) -> FederatedAlgorithm:
    """FedAPM (see the module docstring for the round and the flags)."""
    part = partial.model_partition(model, cfg.personal)
    trainer = partial.ClientTrainer(model, part, cfg.schedule, cfg.schedule)
    read_in_map = cfg.strategy.strategy != "sharded"  # see `admm.client_update`
    client_update = admm.client_update(trainer, read_in_map)

    def init(key, train, params=None):
        algorithm.check_data(model, train, cfg.clients_per_round)
        v, u = part.split(algorithm.initial_params(model, key, params))
        stack = lambda tree: round_lib.replicate(tree, train.num_clients)
        return FedAPMState(jnp.zeros((), jnp.int32), u, stack(v), stack(u),
                           stack(jax.tree.map(jnp.zeros_like, u)), cfg.hparams())

    def round_fn(state, train, key, cohort=None):
        cohort, data, keys, n = round_lib.start(
            key, train, cfg.clients_per_round, cohort,
            state_clients=round_lib.num_clients_of(state.client_personal))
        broadcast, dual_in = admm.dual_inputs(state.client_dual, cohort, read_in_map)
        alpha = admm.client_weight(train, cfg.client_weight)
        (v, u_i, losses, drift), _ = ex.map_reduce(
            client_update, (state.shared, state.hparams, alpha, broadcast),
            (cohort.take(state.client_personal), dual_in, data, keys), cfg.strategy)
        shared, client_shared, client_dual, dual = admm.server_step(
            cfg.server_average, state.shared, u_i, state.client_shared, state.client_dual, cohort,
            train, n, state.hparams["rho"])
        has = (n > 0).astype(jnp.float32)
        metrics = {"train_loss": round_lib.mean_loss(losses, n),
                   "drift": round_lib.mean_loss(drift, has)}
        if cfg.diagnostics:
            metrics["diagnostics"] = {"clients": cohort.ids, "drift": drift,
                                      "dual_norm": jax.vmap(optax.tree.norm)(dual)}
        return state.replace(round=state.round + 1, shared=shared,
                             client_personal=cohort.put(state.client_personal, v),
                             client_shared=client_shared, client_dual=client_dual), metrics

    def evaluate(state, train, test):
        del train
        return admm.evaluate(trainer, state, test, cfg.evaluation, cfg.strategy)

    return FederatedAlgorithm(init, round_fn, evaluate)
