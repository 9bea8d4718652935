"""Local training and evaluation of ONE client (the engine vmaps them).

Two batching modes, both with shapes fixed by (N, B, T):

* step mode (`local_steps=T`): T minibatches of B indices drawn uniformly
  with replacement in [0, n_i), so padding rows are never touched;
* epoch mode (`local_epochs=E`): each epoch is a fresh permutation of the
  client's n_i valid rows cut into ceil(N / B) batches; batches past
  ceil(n_i / B) are empty and their steps are masked (no-ops, optimizer state
  included), and a partial last batch is averaged over its valid rows.

A client with 0 examples is a no-op in both modes. `scan_plan` is the one
local loop (plan in, masked steps); algorithms whose step is not a plain
optimizer step on the loss (APFL, pFedMe, meta-FL) pass their own step to it,
or to `local_train` / `LocalSchedule.run` (`step_fn`).

BatchNorm models: `model_loss_fn(model)` carries the model's `update_stats`,
and the default step of `local_train` then marks the minibatch's valid rows
(`models.model.TRAIN_MASK`, so a partial batch's statistics skip its padding)
and, after each optimizer step, moves the running statistics of the NEW params
by one running-average step on the same rows. Custom steps and wrapped loss
functions (blocks of the params) leave the statistics as they are.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from fedjax_pfl.core.evaluation import evaluate_client  # noqa: F401 - re-exported
from fedjax_pfl.data.client_data import ClientData, client_capacity, client_rows
from fedjax_pfl.models.model import TRAIN_MASK, Model

OptimizerSpec = str | Callable[[float], optax.GradientTransformation] | optax.GradientTransformation


class LocalResult(NamedTuple):
    """Outcome of `local_train` for one client.

    Attributes:
      params: the trained params (with a custom step: the final carry).
      losses: [T] mean data loss of each step's minibatch (0 on empty steps).
      counts: [T] number of valid examples in each step's minibatch.
    """

    params: object
    losses: jax.Array
    counts: jax.Array

    def mean_loss(self, last_steps: int | None = None) -> jax.Array:
        """Example-weighted mean training loss (over the last `last_steps` steps)."""
        losses, counts = self.losses, self.counts
        if last_steps is not None:
            losses, counts = losses[-last_steps:], counts[-last_steps:]
        return jnp.sum(losses * counts) / jnp.maximum(jnp.sum(counts), 1.0)


def make_optimizer(spec: OptimizerSpec, learning_rate) -> optax.GradientTransformation:
    """An optax optimizer from a name ("sgd", "adam", ...), a factory `lr -> opt`, or itself.

    A ready `GradientTransformation` keeps its own learning rate; the other
    forms take `learning_rate`, which may be a traced scalar (for sweeps).
    """
    if isinstance(spec, optax.GradientTransformation):
        return spec
    if isinstance(spec, str):
        return getattr(optax, spec)(learning_rate=learning_rate)
    return spec(learning_rate)


def check_optimizer(name: str, spec: OptimizerSpec) -> None:
    """Raises ValueError (naming `name`) unless `spec` builds an optax optimizer."""
    if isinstance(spec, str) and not callable(getattr(optax, spec, None)):
        raise ValueError(f"{name}: {spec!r} is not an optax optimizer name (e.g. 'sgd', 'adam').")
    try:
        opt = make_optimizer(spec, 0.1)
    except Exception as e:  # noqa: BLE001 - reported with the argument's name
        raise ValueError(f"{name}: could not build an optax optimizer from {spec!r}: {e}") from e
    if not isinstance(opt, optax.GradientTransformation):
        raise ValueError(f"{name}: expected an optax GradientTransformation, got {type(opt)}.")


@dataclasses.dataclass(frozen=True)
class LocalSchedule:
    """How a client trains locally: batching and optimizer (static configuration).

    Attributes:
      batch_size: B.
      local_steps: T minibatch steps (step mode), or None.
      local_epochs: E epochs (epoch mode), or None. With neither set: one epoch.
      optimizer: an optax optimizer name, a factory `lr -> optimizer`, or a
        ready `optax.GradientTransformation` (which keeps its own lr).
      prefix: prepended to argument names in error messages (e.g. "ft_").
      allow_zero: accept 0 steps / epochs. Off for training schedules (0
        would report a loss of 0 while nothing trains); fine-tuning before
        evaluation turns it on (`ft_steps=0` evaluates the global model).
    """

    batch_size: int = 32
    local_steps: int | None = None
    local_epochs: int | None = None
    optimizer: OptimizerSpec = "sgd"
    prefix: str = ""
    allow_zero: bool = False

    def __post_init__(self):
        p = self.prefix
        if not (_is_int(self.batch_size) and self.batch_size >= 1):
            raise ValueError(f"{p}batch_size: expected an int >= 1, got {self.batch_size!r}.")
        if self.local_steps is not None and self.local_epochs is not None:
            raise ValueError(f"{p}local_steps / {p}local_epochs: set at most one, got "
                             f"local_steps={self.local_steps!r}, "
                             f"local_epochs={self.local_epochs!r}.")
        least = 0 if self.allow_zero else 1
        for name in ("local_steps", "local_epochs"):
            v = getattr(self, name)
            if v is not None and not (_is_int(v) and v >= least):
                raise ValueError(f"{p}{name}: expected an int >= {least}, got {v!r}.")
        check_optimizer(f"{p}optimizer", self.optimizer)

    @property
    def epochs(self) -> int | None:
        """E in epoch mode (1 when neither steps nor epochs were given), else None."""
        if self.local_steps is not None:
            return None
        return 1 if self.local_epochs is None else self.local_epochs

    def num_steps(self, max_examples: int) -> int:
        """T, the (static) number of scanned steps for padded size N."""
        if self.local_steps is not None:
            return self.local_steps
        return self.epochs * math.ceil(max_examples / self.batch_size)

    def train(self, loss_fn, params, data, key, learning_rate, penalty=None) -> LocalResult:
        """`local_train` with this schedule and `make_optimizer(optimizer, learning_rate)`."""
        return local_train(params, data, key, loss_fn=loss_fn,
                           optimizer=make_optimizer(self.optimizer, learning_rate),
                           batch_size=self.batch_size, local_steps=self.local_steps,
                           local_epochs=self.epochs, penalty=penalty)

    def run(self, step_fn, carry, data, key) -> LocalResult:
        """`local_train` with this schedule and a custom `step_fn` (see `scan_plan`)."""
        return local_train(carry, data, key, batch_size=self.batch_size,
                           local_steps=self.local_steps, local_epochs=self.epochs,
                           step_fn=step_fn)

    def plan(self, key, data):
        """`batch_plan(key, ...)` of one client's `data` under this schedule."""
        return batch_plan(key, data.num_examples, client_capacity(data),
                          batch_size=self.batch_size, local_steps=self.local_steps,
                          local_epochs=self.epochs)


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def batch_plan(key, num_examples, max_examples: int, *, batch_size: int,
               local_steps: int | None = None, local_epochs: int | None = None):
    """Minibatch indices and per-example weights for one client.

    Returns:
      (idx [T, B] int32, weights [T, B] float32); each step's weights sum to 1
      over its valid examples, or are all 0 for an empty step.
    """
    n = jnp.asarray(num_examples, jnp.int32)
    if local_steps is not None:
        idx = jax.random.randint(key, (local_steps, batch_size), 0, jnp.maximum(n, 1))
        w = jnp.where(n > 0, 1.0 / batch_size, 0.0)
        return idx.astype(jnp.int32), jnp.full((local_steps, batch_size), w, jnp.float32)
    per_epoch = math.ceil(max_examples / batch_size)
    slots = per_epoch * batch_size

    def epoch(k):
        u = jnp.where(jnp.arange(max_examples) < n, jax.random.uniform(k, (max_examples,)), 2.0)
        perm = jnp.pad(jnp.argsort(u), (0, slots - max_examples)).astype(jnp.int32)
        valid = jnp.arange(slots) < n
        return perm.reshape(per_epoch, batch_size), valid.reshape(per_epoch, batch_size)

    idx, valid = jax.vmap(epoch)(jax.random.split(key, local_epochs))
    idx, valid = idx.reshape(-1, batch_size), valid.reshape(-1, batch_size)
    w = valid / jnp.maximum(valid.sum(axis=1, keepdims=True), 1)
    return idx, w.astype(jnp.float32)


def scan_plan(step_fn: Callable, carry, data: ClientData, idx, weights, xs=None) -> LocalResult:
    """Scans `step_fn` over a batch plan, masking the steps with no examples.

    THE local loop of every algorithm (its step is the only part that varies).

    Args:
      step_fn: `step_fn(carry, batch, weights, x) -> (new_carry, data_loss)`
        for one step's minibatch `batch` (the client's rows `idx[t]`), its
        per-example weights [B] and `x`, the step's slice of `xs`.
      carry: the starting carry (params, optimizer state, ...).
      data: one client's view.
      idx, weights: the plan [T, B] (`batch_plan`).
      xs: per-step inputs (leaves [T, ...]) or None.

    Returns:
      `LocalResult(final carry, losses [T], counts [T])`; a step with no
      example leaves the whole carry unchanged.
    """
    def step(c, s):
        i, w, x = s
        new, data_loss = step_fn(c, client_rows(data, i), w, x)
        count = jnp.sum(w > 0).astype(jnp.float32)
        return optax.tree.where(count > 0, new, c), (data_loss, count)

    carry, (losses, counts) = jax.lax.scan(step, carry, (idx, weights, xs))
    return LocalResult(carry, losses, counts)


def optimizer_step(optimizer: optax.GradientTransformation, value_and_grad: Callable) -> Callable:
    """A step that moves the carry (params, opt_state) by one `optimizer` step.

    `value_and_grad(params, batch, weights, x) -> (data_loss, grads)` gives
    the step's direction (the gradient of the local objective, or e.g. a
    meta-gradient).
    """
    def step(carry, batch, w, x):
        p, opt_state = carry
        data_loss, grads = value_and_grad(p, batch, w, x)
        updates, new_opt_state = optimizer.update(grads, opt_state, p)
        return (optax.apply_updates(p, updates), new_opt_state), data_loss

    return step


def loss_grad(loss_fn: Callable, penalty: Callable | None = None) -> Callable:
    """`value_and_grad` of `optimizer_step` for the weighted minibatch loss (+ `penalty`)."""
    def objective(p, batch, w, k):
        data_loss = jnp.sum(w * loss_fn(p, batch, k))
        return data_loss + (penalty(p) if penalty is not None else 0.0), data_loss

    def value_and_grad(p, batch, w, k):
        (_, data_loss), grads = jax.value_and_grad(objective, has_aux=True)(p, batch, w, k)
        return data_loss, grads

    return value_and_grad


def local_train(
    params,
    data: ClientData,
    key: jax.Array,
    *,
    loss_fn: Callable | None = None,
    optimizer: optax.GradientTransformation | None = None,
    batch_size: int,
    local_steps: int | None = None,
    local_epochs: int | None = None,
    penalty: Callable | None = None,
    step_fn: Callable | None = None,
) -> LocalResult:
    """Runs T steps on ONE client's data (`batch_plan` + `scan_plan`).

    Args:
      params: the starting params (with `step_fn`: the starting carry).
      data: one client's view (`examples` leaves [N, ...] and `num_examples`
        a scalar, or a flat store with the client's offset; see `ClientData`).
      key: the client's key for this round (split into the plan's key and
        the steps' keys, one per step).
      loss_fn: `loss_fn(params, batch, key) -> [B]` per-example loss.
      optimizer: the client optimizer; its state starts fresh.
      batch_size, local_steps, local_epochs: the schedule (see module doc).
      penalty: optional `penalty(params) -> scalar` added to each step's
        objective (e.g. a proximal term); not included in `losses`.
      step_fn: a custom step `step_fn(carry, batch, weights, key) -> (carry,
        data_loss)` (see `scan_plan`) instead of `optimizer_step(optimizer,
        loss_grad(loss_fn, penalty))`.

    Returns:
      `LocalResult(params, losses [T], counts [T])` (with `step_fn`: the
      final carry as `params`).
    """
    plan_key, step_key = jax.random.split(key)
    idx, weights = batch_plan(plan_key, data.num_examples, client_capacity(data),
                              batch_size=batch_size,
                              local_steps=local_steps, local_epochs=local_epochs)
    keys = jax.random.split(step_key, idx.shape[0])
    if step_fn is not None:
        return scan_plan(step_fn, params, data, idx, weights, keys)
    step = optimizer_step(optimizer, loss_grad(loss_fn, penalty))
    update_stats = getattr(loss_fn, "update_stats", None)
    if update_stats is not None:
        step = stats_step(step, update_stats)
    result = scan_plan(step, (params, optimizer.init(params)), data, idx, weights, keys)
    return result._replace(params=result.params[0])


def stats_step(step: Callable, update_stats: Callable) -> Callable:
    """`step` (carry (params, ...)) on a batch with its valid rows marked (`TRAIN_MASK`),
    then `update_stats(new params, batch, weights)` (the running statistics)."""
    def wrapped(carry, batch, w, x):
        batch = {**batch, TRAIN_MASK: w > 0}
        (p, *rest), data_loss = step(carry, batch, w, x)
        return (update_stats(p, batch, w), *rest), data_loss

    return wrapped


@dataclasses.dataclass(frozen=True)
class ModelLoss:
    """`loss_fn(params, batch, key) -> [B]` of a `Model`, carrying its `update_stats`
    (None for a model without running statistics)."""

    model: Model

    @property
    def update_stats(self) -> Callable | None:
        return self.model.update_stats

    def __call__(self, params, batch, key):
        return self.model.loss(self.model.apply(params, batch, key), batch)


def model_loss_fn(model: Model) -> ModelLoss:
    """`loss_fn(params, batch, key) -> [B]` for `local_train`, from a `Model` (with the
    model's `update_stats`: `local_train` updates BatchNorm statistics)."""
    return ModelLoss(model)
