"""How `execution.map_reduce` combines the clients' `z` outputs: monoids.

A `Reduction` is an associative `combine` with an `identity`; the client axis
may be folded in any order and grouping (chunks, devices), so every strategy
gives the same result up to float rounding. Two are provided:

* `SUM`: plain addition (the default; what every algorithm used before);
* `LOG_WEIGHTED_SUM`: sum_i e^{a_i} x_i for per-client log-weights a_i, kept
  as (m, den, acc) meaning e^m * acc and e^m * den = sum_i e^{a_i}, with m the
  running max of the a_i (the online rescaling of flash attention). Weights
  spanning hundreds of e-folds, or all far below exp's range, stay exact
  where a plain sum of e^{a_i} x_i would underflow to 0 / 0. A client adds
  `log_weighted_term(a_i, x_i)`; `log_weighted_mean` turns the total into
  sum_i softmax(a)_i x_i.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class Reduction:
    """An associative reduction of per-client pytrees (a monoid).

    Attributes:
      identity: `identity(z) -> z0`, the neutral element shaped like one
        client's `z` (masked and padding rows are replaced by it).
      combine: `combine(a, b) -> a (+) b` for two single elements.
      fold: optional `fold(zs) -> z`, the reduction of a leading axis in one
        step (default: a pairwise tree of `combine`).
      all_reduce: optional `all_reduce(z, axis_name) -> z`, the reduction
        across the devices of a `shard_map` axis, replicated on each (default:
        every device's z gathered by a `psum` of one-hot rows, then `fold`).
    """

    identity: Callable
    combine: Callable
    fold: Callable | None = None
    all_reduce: Callable | None = None

    def fold_axis(self, zs):
        """Reduces the leading axis of `zs` (leaves [n, ...], n >= 1)."""
        if self.fold is not None:
            return self.fold(zs)
        while (n := jax.tree.leaves(zs)[0].shape[0]) > 1:
            if n % 2:  # pad to even with the identity
                zero = jax.tree.map(lambda a: a[None], self.identity(
                    jax.tree.map(lambda a: a[0], zs)))
                zs = jax.tree.map(lambda a, b: jnp.concatenate([a, b]), zs, zero)
            zs = jax.vmap(self.combine)(jax.tree.map(lambda a: a[0::2], zs),
                                        jax.tree.map(lambda a: a[1::2], zs))
        return jax.tree.map(lambda a: a[0], zs)

    def across(self, z, axis_name: str):
        """Reduces `z` over the devices of `axis_name` (inside `shard_map`)."""
        if self.all_reduce is not None:
            return self.all_reduce(z, axis_name)
        size, me = jax.lax.psum(1, axis_name), jax.lax.axis_index(axis_name)
        rows = lambda a: jax.lax.psum(jnp.zeros((size,) + a.shape, a.dtype).at[me].set(a),
                                      axis_name)  # psum: the gathered rows are replicated
        return self.fold_axis(jax.tree.map(rows, z))


SUM = Reduction(
    identity=lambda z: jax.tree.map(jnp.zeros_like, z),
    combine=lambda a, b: jax.tree.map(jnp.add, a, b),
    fold=lambda zs: jax.tree.map(lambda a: jnp.sum(a, axis=0), zs),
    all_reduce=lambda z, axis: jax.tree.map(lambda a: jax.lax.psum(a, axis), z))


def _scales(m, top):
    """e^{m - top}, 0 where m = -inf (also when top = -inf: no weight at all)."""
    return jnp.where(m == -jnp.inf, 0.0, jnp.exp(m - jnp.where(top == -jnp.inf, 0.0, top)))


def _rescaled_sum(elements, top, total):
    """(top, sum of den * s, sum of acc * s) with s the scales to `top`; `total`
    sums a leading axis (`jnp.sum(., 0)`) or devices (`psum`)."""
    m, den, acc = elements
    s = _scales(m, top)
    scale = lambda a: a * s.reshape(s.shape + (1,) * (a.ndim - s.ndim)).astype(a.dtype)
    return top, total(scale(den)), jax.tree.map(lambda a: total(scale(a)), acc)


def _lws_identity(z):
    m, den, acc = z
    return (jnp.full_like(m, -jnp.inf), jnp.zeros_like(den), jax.tree.map(jnp.zeros_like, acc))


def _lws_combine(a, b):
    top = jnp.maximum(a[0], b[0])
    return _rescaled_sum(jax.tree.map(lambda x, y: jnp.stack([x, y]), a, b), top,
                         lambda x: jnp.sum(x, axis=0))


def _lws_fold(zs):
    return _rescaled_sum(zs, jnp.max(zs[0], axis=0), lambda x: jnp.sum(x, axis=0))


def _lws_all_reduce(z, axis):
    # psum cannot rescale: agree on the max first, rescale locally, then sum.
    return _rescaled_sum(z, jax.lax.pmax(z[0], axis), lambda x: jax.lax.psum(x, axis))


LOG_WEIGHTED_SUM = Reduction(_lws_identity, _lws_combine, _lws_fold, _lws_all_reduce)


def log_weighted_term(log_weight, tree):
    """One client's element of `LOG_WEIGHTED_SUM`: weight e^{log_weight} on `tree`
    (log_weight = -inf: no weight; then `tree` must be finite)."""
    log_weight = jnp.asarray(log_weight, jnp.float32)
    return log_weight, jnp.ones_like(log_weight), tree


def log_weighted_mean(total):
    """sum_i e^{a_i} x_i / sum_i e^{a_i} from a `LOG_WEIGHTED_SUM` total; zeros when
    no client had weight (every a_i = -inf)."""
    _, den, acc = total
    safe = jnp.where(den > 0, den, 1.0)
    return jax.tree.map(lambda a: jnp.where(den > 0, a / safe.astype(a.dtype), 0.0), acc)
