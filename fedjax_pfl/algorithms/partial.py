"""Partial model personalization: the pieces FedAlt, FedSim, FedRep, FedPer and FedAPM share.

The params of one model are split by `core.params.partition` into a personal
block v (kept per client, stacked [M, ...]) and a shared block u (one server
copy). Client code is written for ONE client and vmapped by the engine:

* `ClientTrainer.personal` trains v with u frozen, `ClientTrainer.shared`
  trains a local copy u_i with v frozen (the two phases of alternating
  methods), and `ClientTrainer.joint` trains (v, u_i) together on the same
  minibatches (simultaneous methods);
* `partial_pfl` builds the canonical stateful baselines of Pillutla et al.
  ("Federated Learning with Partial Model Personalization", ICML 2022):
  mode "alternating" (FedAlt; FedRep is the head-personal case) and
  "simultaneous" (FedSim; FedPer is the head-personal case). The shared
  block is averaged over the cohort (weighted by n_i or uniformly).

Within a round, the personal phase uses the key `fold_in(client_key, 0)` and
the shared (or joint) phase `fold_in(client_key, 1)`, so alternating methods
that differ only in their penalties draw the same minibatches.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import optax
from flax import struct

from fedjax_pfl.core import aggregation, algorithm, local
from fedjax_pfl.core import execution as ex
from fedjax_pfl.core import params as params_lib
from fedjax_pfl.core import round as round_lib
from fedjax_pfl.core.algorithm import FederatedAlgorithm
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


def model_partition(model: Model, personal: params_lib.Label) -> params_lib.Partition:
    """The `Partition` of `model`'s params (from shapes only; nothing is computed)."""
    return params_lib.partition(jax.eval_shape(model.init, jax.random.key(0)), personal)


def personal_schedule(schedule: local.LocalSchedule, personal_steps, personal_epochs):
    """The personal phase's schedule: `schedule` unless personal_steps/epochs is set."""
    if personal_steps is None and personal_epochs is None:
        return schedule
    for name, v in (("personal_steps", personal_steps), ("personal_epochs", personal_epochs)):
        algorithm.check_arg(name, v, v is None or (isinstance(v, int) and not isinstance(v, bool)
                                                    and v >= 1), "None or an int >= 1")
    algorithm.check_arg("personal_epochs", personal_epochs,
                        personal_steps is None or personal_epochs is None,
                        "unset when personal_steps is set")
    return dataclasses.replace(schedule, local_steps=personal_steps, local_epochs=personal_epochs)


def sq_norm(tree) -> jax.Array:
    """‖tree‖² (sum over leaves)."""
    return optax.tree.norm(tree, squared=True)


def drift_norm(u_i, u) -> jax.Array:
    """Σ over shared tensors of ‖u_i − u‖_F (FedAPM's client-drift statistic)."""
    return sum(jnp.sqrt(jnp.sum((a - b) ** 2)) for a, b in zip(jax.tree.leaves(u_i),
                                                                 jax.tree.leaves(u)))


@dataclasses.dataclass(frozen=True)
class ClientTrainer:
    """Block-wise local training of ONE client (static configuration).

    `scale` multiplies the data loss (FedAPM's client weight α_i); the
    reported mean loss is divided by it again. `penalty(block) -> scalar` is
    added to each step's objective.
    """

    model: Model
    part: params_lib.Partition
    schedule: local.LocalSchedule
    personal_schedule: local.LocalSchedule

    def _loss(self, merge, scale):
        loss = local.model_loss_fn(self.model)
        return lambda p, batch, key: scale * loss(merge(p), batch, key)

    def personal(self, v, u, data, key, lr, penalty=None, scale=1.0):
        """Personal phase: trains v with u frozen. Returns (v', mean loss)."""
        fn = self._loss(lambda p: self.part.merge(p, u), scale)
        r = self.personal_schedule.train(fn, v, data, jax.random.fold_in(key, 0), lr, penalty)
        return r.params, r.mean_loss() / scale

    def shared(self, v, u, data, key, lr, penalty=None, scale=1.0):
        """Shared phase: trains u_i (from u) with v frozen. Returns (u_i, mean loss)."""
        fn = self._loss(lambda p: self.part.merge(v, p), scale)
        r = self.schedule.train(fn, u, data, jax.random.fold_in(key, 1), lr, penalty)
        return r.params, r.mean_loss() / scale

    def joint(self, v, u, data, key, lr):
        """Simultaneous phase: (v, u_i) on the same minibatches. Returns (v', u_i, loss)."""
        fn = self._loss(lambda p: self.part.merge(*p), 1.0)
        r = self.schedule.train(fn, (v, u), data, jax.random.fold_in(key, 1), lr)
        return r.params[0], r.params[1], r.mean_loss()

    def evaluate(self, u, test, client_personal, execution):
        """Per-client test statistics [M] of (v_i, u) (u may be per-client too)."""
        def one(shared, x):
            v, data = x
            return local.evaluate_client(self.model, self.part.merge(v, shared), data)
        return ex.map_clients(one, u, (client_personal, test), execution)


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
