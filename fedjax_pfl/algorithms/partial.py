"""Stateful partial model personalization: FedAlt, FedSim, FedRep and FedPer.

The params of one model are split by `core.params.partition` into a personal
block v (kept per client, stacked [M, ...]) and a shared block u (one server
copy); ONE client's training is `core.partial.ClientTrainer`.
`partial_pfl` builds the canonical stateful baselines of Pillutla et al.
  ("Federated Learning with Partial Model Personalization", ICML 2022):
  mode "alternating" (FedAlt; FedRep is the head-personal case) and
  "simultaneous" (FedSim; FedPer is the head-personal case). The shared
  block is averaged over the cohort (weighted by n_i or uniformly).

Within a round, the personal phase uses the key `fold_in(client_key, 0)` and
the shared (or joint) phase `fold_in(client_key, 1)`, so alternating methods
that differ only in their penalties draw the same minibatches (see `core.partial`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct

from fedjax_pfl.core import aggregation, algorithm, local
from fedjax_pfl.core import execution as ex
from fedjax_pfl.core import params as params_lib
from fedjax_pfl.core import round as round_lib
from fedjax_pfl.core.algorithm import FederatedAlgorithm
from fedjax_pfl.core.partial import ClientTrainer, drift_norm, model_partition, personal_schedule
from fedjax_pfl.models.model import Model

WEIGHTINGS = ("num_examples", "uniform")
MODES = ("alternating", "simultaneous")


@struct.dataclass
class PartialState:
    """State of FedAlt / FedSim / FedRep / FedPer.

    Attributes:
      round: int32 scalar, rounds completed.
      shared: u, the server's shared block: flat dict {path: leaf}.
      client_personal: v_i, every client's personal block, leaves [M, ...].
      hparams: traced scalars: client_lr.
    """

    round: jax.Array
    shared: dict
    client_personal: dict
    hparams: dict


def partial_pfl(
    model: Model,
    *,
    mode: str,
    personal: params_lib.Label = ("head",),
    clients_per_round: int | None = None,
    batch_size: int = 32,
    local_steps: int | None = None,
    local_epochs: int | None = None,
    personal_steps: int | None = None,
    personal_epochs: int | None = None,
    client_optimizer: local.OptimizerSpec = "sgd",
    client_lr: float = 0.05,
    weighting: str = "num_examples",
    execution: str | ex.Execution = "vmap",
) -> FederatedAlgorithm:
    """Stateful partial personalization (FedAlt / FedSim); see `fedalt`, `fedsim`."""
    algorithm.check_arg("mode", mode, mode in MODES, f"one of {MODES}")
    algorithm.check_cohort_size(clients_per_round)
    algorithm.check_number("client_lr", client_lr)
    algorithm.check_arg("weighting", weighting, weighting in WEIGHTINGS, f"one of {WEIGHTINGS}")
    part = model_partition(model, personal)
    schedule = local.LocalSchedule(batch_size, local_steps, local_epochs, client_optimizer)
    if mode == "simultaneous":
        algorithm.check_arg("personal_steps", (personal_steps, personal_epochs),
                            personal_steps is None and personal_epochs is None,
                            "None for mode 'simultaneous' (both blocks share the schedule)")
    trainer = ClientTrainer(model, part, schedule,
                            personal_schedule(schedule, personal_steps, personal_epochs))
    execution = ex.as_execution(execution)

    def init(key, train, params=None):
        algorithm.check_data(model, train, clients_per_round)
        v, u = part.split(algorithm.initial_params(model, key, params))
        return PartialState(jnp.zeros((), jnp.int32), u, round_lib.replicate(v, train.num_clients),
                            algorithm.hparams(client_lr=client_lr))

    def client_update(broadcast, x):
        u, hp = broadcast
        v, data, key, weight = x
        if mode == "alternating":
            v, _ = trainer.personal(v, u, data, key, hp["client_lr"])
            u_i, loss = trainer.shared(v, u, data, key, hp["client_lr"])
        else:
            v, u_i, loss = trainer.joint(v, u, data, key, hp["client_lr"])
        return (v, loss, drift_norm(u_i, u)), aggregation.weighted_delta(u_i, u, weight)

    def round_fn(state, train, key, cohort=None):
        cohort, data, keys, n = round_lib.start(
            key, train, clients_per_round, cohort,
            state_clients=round_lib.num_clients_of(state.client_personal))
        weights = n if weighting == "num_examples" else (n > 0).astype(jnp.float32)
        (v, losses, drift), (delta_sum, weight_sum) = ex.map_reduce(
            client_update, (state.shared, state.hparams),
            (cohort.take(state.client_personal), data, keys, weights), execution)
        mean_delta = aggregation.safe_div(delta_sum, weight_sum)
        shared = jax.tree.map(jnp.add, state.shared, mean_delta)
        has = (n > 0).astype(jnp.float32)
        metrics = {"train_loss": round_lib.mean_loss(losses, n),
                   "drift": round_lib.mean_loss(drift, has)}
        return state.replace(round=state.round + 1, shared=shared,
                             client_personal=cohort.put(state.client_personal, v)), metrics

    def evaluate(state, train, test):
        del train
        return trainer.evaluate(state.shared, test, state.client_personal, execution)

    return FederatedAlgorithm(init, round_fn, evaluate)
