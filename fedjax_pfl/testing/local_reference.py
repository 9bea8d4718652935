"""Reference local training for the naive loops, written without the package's trainer.

Nothing here comes from `core.local`, `core.partial`, `core.params`, `core.metagrad` or
the algorithms: the references must catch a bug in those, not copy it. What IS shared
with the package is the randomness contract, re-derived here from `jax.random`:

* client i of a round with key `r` trains with `key_i = fold_in(fold_in(r, 1), i)`
  (`core.sampling.round_keys` / `client_keys`), and a local training run with key
  `k` splits it as `plan_key, step_key = split(k)`;
* step mode (T steps of B): the rows are `randint(plan_key, (T, B), 0, max(n, 1))`,
  drawn with replacement from the n valid rows;
* epoch mode (E epochs): epoch e draws `uniform(split(plan_key, E)[e], (N,))` over
  the N padded rows and visits the n valid rows in increasing order of their draw,
  cut into ceil(N / B) batches of B (the last non-empty batch may be partial; the
  batches past ceil(n / B) are empty steps, which change nothing);
* step t's model key (dropout) is `split(step_key, T)[t]`.

A step's loss is the MEAN per-example loss over the step's rows (a partial batch is
averaged over its own rows), and plain SGD moves the trained block by `-lr` times
the gradient of that mean plus the gradient of any penalty, given in closed form.

Caveat: a model whose `apply` uses its key (dropout) draws masks over the batch it
is given; the package pads a partial epoch-mode batch to B rows, the reference
does not, so for such models only step mode (always B rows) agrees exactly.
"""

from __future__ import annotations

import functools
import math
import re
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

# ----------------------------------------------------------------------------- schedule


class Schedule(NamedTuple):
    """Batching of one local run: T steps (`steps`) or E epochs (`epochs`), batch B."""

    batch_size: int
    steps: int | None
    epochs: int | None

    @classmethod
    def of(cls, batch_size: int, local_steps: int | None, local_epochs: int | None) -> Schedule:
        """Step mode if `local_steps` is set, else `local_epochs` epochs (default 1)."""
        if local_steps is not None:
            return cls(batch_size, local_steps, None)
        return cls(batch_size, None, 1 if local_epochs is None else local_epochs)

    def num_steps(self, max_examples: int) -> int:
        if self.steps is not None:
            return self.steps
        return self.epochs * math.ceil(max_examples / self.batch_size)


def minibatches(plan_key, n: int, max_examples: int, schedule: Schedule) -> list[np.ndarray]:
    """The row ids of every step (an empty array for an empty step).

    Args:
      plan_key: the plan half of the run's key.
      n: the client's number of valid rows.
      max_examples: N, the padded number of rows (epoch mode draws N uniforms).
      schedule: the run's `Schedule`.
    """
    b = schedule.batch_size
    if schedule.steps is not None:
        if n == 0:
            return [np.zeros((0,), np.int64)] * schedule.steps
        rows = np.asarray(jax.random.randint(plan_key, (schedule.steps, b), 0, n))
        return list(rows)
    per_epoch = math.ceil(max_examples / b)
    steps = []
    for epoch_key in jax.random.split(plan_key, schedule.epochs):
        draws = np.asarray(jax.random.uniform(epoch_key, (max_examples,)))[:n]
        order = np.argsort(draws, kind="stable")
        steps += [order[j * b:(j + 1) * b] for j in range(per_epoch)]
    return steps


# ----------------------------------------------------------------------------- trees


def tree_axpy(a: float, x, y):
    """y + a x, leaf by leaf (float32 like the package)."""
    return jax.tree.map(lambda xi, yi: np.asarray(yi + a * xi, np.float32), x, y)


def tree_add(*trees):
    return jax.tree.map(lambda *xs: np.asarray(sum(xs), np.float32), *trees)


def tree_sub(x, y):
    return jax.tree.map(lambda a, b: np.asarray(a - b, np.float32), x, y)


def tree_scale(a: float, x):
    return jax.tree.map(lambda xi: np.asarray(a * xi, np.float32), x)


def as_numpy(tree):
    return jax.tree.map(lambda a: np.asarray(a, np.float32), tree)


# ----------------------------------------------------------------------------- the model


@functools.lru_cache(maxsize=64)
def _value_and_grad(model):
    def mean_loss(params, batch, key):
        return jnp.mean(model.loss(model.apply(params, batch, key), batch))

    return jax.jit(jax.value_and_grad(mean_loss))


def loss_and_grad(model, params, examples: dict, rows, key=None):
    """(mean loss, its gradient) of `params` on the rows `rows` of `examples`."""
    batch = {k: v[np.asarray(rows)] for k, v in examples.items()}
    value, grad = _value_and_grad(model)(params, batch, key)
    return float(value), as_numpy(grad)


@functools.lru_cache(maxsize=64)
def _hvp(model):
    grad = lambda p, batch: jax.grad(
        lambda q: jnp.mean(model.loss(model.apply(q, batch, None), batch)))(p)
    return jax.jit(lambda p, v, batch: jax.jvp(lambda q: grad(q, batch), (p,), (v,))[1])


def hessian_vector(model, params, vector, examples: dict, rows):
    """H v, H the Hessian of the mean loss on `rows` at `params` (forward-over-reverse)."""
    batch = {k: v[np.asarray(rows)] for k, v in examples.items()}
    return as_numpy(_hvp(model)(params, vector, batch))


def mean_loss(model, params, examples: dict, n: int) -> float:
    """Mean loss of `params` on the n valid rows (0 when there are none), float64."""
    if n == 0:
        return 0.0
    batch = {k: v[:n] for k, v in examples.items()}
    return float(np.mean(np.asarray(model.loss(model.apply(params, batch, None), batch),
                                    np.float64)))


# ----------------------------------------------------------------------------- local SGD


class Run(NamedTuple):
    """A local run: the trained block and each step's mean loss and number of rows."""

    params: object
    losses: list
    counts: list

    def mean_loss(self, last_steps: int | None = None) -> float:
        """The row-weighted mean of the steps' losses (of the last `last_steps` steps)."""
        losses, counts = self.losses, self.counts
        if last_steps is not None:
            losses, counts = losses[-last_steps:], counts[-last_steps:]
        total = sum(counts)
        return sum(x * c for x, c in zip(losses, counts)) / total if total else 0.0


def sgd(key, n: int, max_examples: int, schedule: Schedule, lr: float, params, data_grad,
        penalty_grad=None) -> Run:
    """Plain SGD over the schedule's minibatches.

    Args:
      key: the run's key (split into the plan key and the step keys).
      n, max_examples: valid and padded rows of the client.
      schedule: the batching.
      lr: the step size.
      params: the trained block (any pytree).
      data_grad: `data_grad(params, rows, step_key) -> (mean loss, gradient)` of the
        data loss on one minibatch.
      penalty_grad: optional `penalty_grad(params) -> gradient` of the penalty.
    """
    plan_key, step_key = jax.random.split(key)
    steps = minibatches(plan_key, n, max_examples, schedule)
    step_keys = jax.random.split(step_key, len(steps))
    losses, counts = [], []
    for rows, step_key_t in zip(steps, step_keys):
        if len(rows) == 0:  # an empty step is a no-op
            losses.append(0.0)
            counts.append(0)
            continue
        loss, grad = data_grad(params, rows, step_key_t)
        if penalty_grad is not None:
            grad = tree_add(grad, penalty_grad(params))
        params = tree_axpy(-lr, grad, params)
        losses.append(loss)
        counts.append(len(rows))
    return Run(params, losses, counts)


def train_model(model, params, examples: dict, n: int, key, schedule: Schedule, lr: float,
                penalty_grad=None) -> Run:
    """Plain SGD on the whole model (`sgd` with the model's data gradient)."""
    data_grad = lambda p, rows, k: loss_and_grad(model, p, examples, rows, k)
    max_examples = len(next(iter(examples.values())))
    return sgd(key, n, max_examples, schedule, lr, as_numpy(params), data_grad, penalty_grad)


def check_sgd(cfg: dict, *names: str) -> None:
    """The references write out plain SGD only: raise for any other optimizer."""
    for name in names or ("client_optimizer",):
        if name in cfg and cfg[name] != "sgd":
            raise ValueError(f"{name}: the naive references implement plain 'sgd' only, got "
                             f"{cfg[name]!r}.")


def server_sgd(cfg: dict, hparams: dict, params, mean_delta):
    """The default server: plain SGD with `server_lr` on the pseudo-gradient -mean_delta."""
    check_sgd(cfg, "server_optimizer")
    lr = float(hparams["server_lr"])
    return jax.tree.map(lambda p, d: jnp.asarray(np.asarray(p, np.float64) + lr * d,
                                                 jnp.float32), params, mean_delta)


# ----------------------------------------------------------------------------- param blocks


def leaf_paths(params) -> list[str]:
    """The "/"-joined path of every leaf, in flatten order (e.g. "hidden_0/kernel")."""
    def name(entry):
        for attr in ("key", "name", "idx"):
            if hasattr(entry, attr):
                return str(getattr(entry, attr))
        return str(entry)

    return ["/".join(name(e) for e in path)
            for path, _ in jax.tree_util.tree_flatten_with_path(params)[0]]


def is_personal(label, path: str) -> bool:
    """Whether `label` (module names, a regex or a predicate) marks `path` personal."""
    if isinstance(label, str):
        return re.search(label, path) is not None
    if callable(label):
        return bool(label(path))
    return path.split("/", 1)[0] in set(label)


class Blocks(NamedTuple):
    """The personal / shared split of a model's params (flat dicts {path: leaf})."""

    treedef: object
    paths: tuple
    personal: tuple

    @classmethod
    def of(cls, model, label) -> Blocks:
        params = jax.eval_shape(model.init, jax.random.key(0))
        paths = tuple(leaf_paths(params))
        return cls(jax.tree.structure(params), paths,
                   tuple(is_personal(label, p) for p in paths))

    def split(self, params):
        leaves = jax.tree.leaves(params)
        v = {p: a for p, m, a in zip(self.paths, self.personal, leaves) if m}
        u = {p: a for p, m, a in zip(self.paths, self.personal, leaves) if not m}
        return v, u

    def merge(self, v: dict, u: dict):
        return jax.tree.unflatten(self.treedef, [v[p] if m else u[p]
                                                 for p, m in zip(self.paths, self.personal)])


def sq_dist_grad(scale: float, x, anchor):
    """Gradient of scale/2 ||x - anchor||^2: scale (x - anchor)."""
    return jax.tree.map(lambda a, b: np.asarray(scale * (a - b), np.float32), x, anchor)
