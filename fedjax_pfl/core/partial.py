"""The partial-personalization trainer: ONE client's block-wise local training.

The params of one model are split by `core.params.partition` into a personal
block v (kept per client, stacked [M, ...]) and a shared block u.
`ClientTrainer.personal` trains v with u frozen, `ClientTrainer.shared`
trains a local copy u_i with v frozen (the two phases of alternating
methods), and `ClientTrainer.joint` trains (v, u_i) together on the same
minibatches (simultaneous methods). Used by FedAlt / FedSim / FedRep / FedPer
(`algorithms.partial`) and FedAPM; `PersonalConfig` and `averaged_round` are
shared by every method with a per-client block and an averaged one (also
LG-FedAvg, FedBABU, FedRoD).

Within a round, the personal phase uses the key `fold_in(client_key, 0)` and
the shared (or joint) phase `fold_in(client_key, 1)`, so alternating methods
that differ only in their penalties draw the same minibatches.
"""


import dataclasses

import jax
import jax.numpy as jnp
import optax
from flax import struct

from fedjax_pfl.core import aggregation, algorithm, config, local
from fedjax_pfl.core import execution as ex
from fedjax_pfl.core import params as params_lib
from fedjax_pfl.core import round as round_lib
from fedjax_pfl.models.model import Model


def model_partition(model: Model, personal: params_lib.Label) -> params_lib.Partition:
    """The `Partition` of `model`'s params (from shapes only; nothing is computed)."""
    return params_lib.partition(jax.eval_shape(model.init, jax.random.key(0)), personal)


@dataclasses.dataclass(frozen=True, kw_only=True)
class PersonalConfig(config.Config):
    """`config.Config` plus the personal block and the server's weighting.

    Attributes:
      personal: which params are personal: top-level module names, a regex on
        "/"-joined leaf paths, or a predicate (see `core.params.partition`).
      weighting: server average of the shared part: "num_examples" (n_i) or "uniform".
    """

    personal: params_lib.Label = ("head",)
    weighting: str = config.weighting()


@struct.dataclass
class PersonalState:
    """State of a method with one shared block and a block per client (FedAlt,
    FedSim, FedRep, FedPer, FedBN).

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


def train_merged(schedule: local.LocalSchedule, loss_fn, part, v, u, data, key, lr):
    """ONE client's joint training of its two blocks as one model: (v', u', mean loss).

    The model's own loss is used unwrapped, so a model with BatchNorm statistics
    keeps them current (`local.model_loss_fn`); LG-FedAvg and FedBN.
    """
    result = schedule.train(loss_fn, part.merge(v, u), data, key, lr)
    v, u = part.split(result.params)
    return v, u, result.mean_loss()


def evaluate_merged(model: Model, merge, shared, client_rows, test, execution):
    """Per-client test statistics [M] of `merge(row_i, shared)` (`shared` may be per-client)."""
    one = lambda u, x: local.evaluate_client(model, merge(x[0], u), x[1])
    return ex.map_clients(one, shared, (client_rows, test), execution)


def averaged_round(cfg: config.Config, client_update, broadcast, client_rows, train, key,
                   cohort=None):
    """One round of a method whose clients keep rows and send a weighted delta.

    `client_update((shared, *broadcast), (row, data, key, weight))` trains ONE
    client and returns `((row', *outputs), weighted_delta)`; the shared part
    (`broadcast[0]`) moves by the cohort's weighted mean delta (`cfg.weights`).
    `client_rows`: leaves [M, ...] (may be empty). Returns (shared', rows',
    outputs [S] (a list), n [S]).
    """
    m = round_lib.num_clients_of(client_rows) if jax.tree.leaves(client_rows) else None
    cohort, data, keys, n = round_lib.start(key, train, cfg.clients_per_round, cohort,
                                            state_clients=m)
    (rows, *outputs), (delta_sum, weight_sum) = ex.map_reduce(
        client_update, broadcast, (cohort.take(client_rows), data, keys, cfg.weights(n)),
        cfg.strategy)
    shared = jax.tree.map(jnp.add, broadcast[0], aggregation.safe_div(delta_sum, weight_sum))
    return shared, cohort.put(client_rows, rows), outputs, n


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
        return evaluate_merged(self.model, self.part.merge, u, client_personal, test, execution)
