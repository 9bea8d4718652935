"""`Model`: a model as a triple of pure functions.

The triple hides the neural-network library: the engine only calls
`init(key) -> params`, `apply(params, batch, key) -> logits` and
`loss(logits, batch) -> per-example loss`. Because these are plain functions,
`jax.vmap(model.init)(keys)` stacks K or M independent models.

Sequence models (per-token prediction) return logits [B, T, C] against labels
[B, T]; their `loss` is still one number per EXAMPLE (the mean over its
counted tokens, see `sequence_cross_entropy`), so training is unchanged, and
their optional `token_mask(batch) -> [B, T] bool` says which tokens count
(padding does not) in `core.local.evaluate_client`.

BatchNorm models (`from_linen` of a module with `batch_stats`) have params
{"params": ..., "batch_stats": ...}: training (`key` given) normalizes with the
minibatch's statistics over its rows marked in `batch[TRAIN_MASK]` (all rows
when absent), evaluation (`key` None) with the running statistics, and
`update_stats` moves those by one running-average step (see `Model`).
"""

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

Params = Any
Batch = dict[str, jax.Array]

TRAIN_MASK = "_train_mask"
"""Optional batch field [B] bool: the rows whose statistics a BatchNorm layer uses in training."""


class Model(NamedTuple):
    """A model as pure functions.

    Attributes:
      init: `init(key) -> params`, a pytree of arrays for ONE model.
      apply: `apply(params, batch, key) -> logits [B, C]`; `key` is None at
        evaluation and a fresh key per step in training (for dropout).
      loss: `loss(logits, batch) -> [B]` per-example loss.
      token_mask: only for sequence models (logits [B, T, C], labels [B, T]):
        `token_mask(batch) -> [B, T]` bool, the tokens that count in
        evaluation (None: every token).
      update_stats: only for models with running statistics (BatchNorm):
        `update_stats(params, batch, weights [B]) -> params`, one running-average
        step of the statistics from a training minibatch's rows with weight > 0
        (PyTorch's momentum 0.1: running = 0.9 running + 0.1 batch statistic);
        the other params are returned unchanged.
    """

    init: Callable[[jax.Array], Params]
    apply: Callable[[Params, Batch, jax.Array | None], jax.Array]
    loss: Callable[[jax.Array, Batch], jax.Array]
    token_mask: Callable[[Batch], jax.Array] | None = None
    update_stats: Callable[[Params, Batch, jax.Array], Params] | None = None


def cross_entropy(logits: jax.Array, batch: Batch) -> jax.Array:
    """Softmax cross-entropy against integer labels `batch["y"]`: [B]."""
    return optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"])


def sequence_cross_entropy(logits: jax.Array, labels: jax.Array, mask: jax.Array) -> jax.Array:
    """Per-example loss [B] of per-token logits [B, T, C]: the mean over `mask`ed tokens.

    An example with no counted token has loss 0.
    """
    token_loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    mask = mask.astype(token_loss.dtype)
    return jnp.sum(token_loss * mask, -1) / jnp.maximum(jnp.sum(mask, -1), 1.0)


def from_linen(
    module: nn.Module,
    input_shape: Sequence[int],
    *,
    input_key: str = "x",
    loss: Callable[[jax.Array, Batch], jax.Array] = cross_entropy,
    input_dtype=jnp.float32,
    token_mask: Callable[[Batch], jax.Array] | None = None,
) -> Model:
    """Wraps a flax.linen module mapping `batch[input_key]` [B, *input_shape] to logits.

    Args:
      module: a linen module whose `__call__(x, train)` returns logits.
      input_shape: the shape of ONE example (no batch axis).
      input_key: the batch field fed to the module.
      loss: per-example loss on (logits, batch).
      input_dtype: the dtype of the dummy input that builds the params
        (an integer dtype for token ids fed to an embedding).
      token_mask: for sequence models, see `Model.token_mask`.

    A module with a `batch_stats` collection (BatchNorm) must accept
    `__call__(x, train, mask=None)` (`mask` [B] bool: the rows whose statistics
    count); its params are then the whole variables dict and the model has
    `update_stats` (see the module doc).
    """
    dummy = jnp.zeros((1, *input_shape), input_dtype)
    variables = jax.eval_shape(lambda k: module.init(k, dummy, train=False), jax.random.key(0))
    if "batch_stats" in variables:
        return _with_batch_stats(module, dummy, input_key, loss, token_mask)

    def init(key):
        return module.init(key, dummy, train=False)["params"]

    def apply(params, batch, key=None):
        rngs = None if key is None else {"dropout": key}
        return module.apply({"params": params}, batch[input_key], train=key is not None, rngs=rngs)

    return Model(init=init, apply=apply, loss=loss, token_mask=token_mask)


def _with_batch_stats(module, dummy, input_key, loss, token_mask) -> Model:
    def init(key):
        variables = module.init(key, dummy, train=False)
        return {"params": variables["params"], "batch_stats": variables["batch_stats"]}

    def train_apply(params, batch, key, mask):
        if mask is not None:  # no valid row (an empty, masked step): every row, to stay finite
            mask = mask | ~jnp.any(mask)
        return module.apply(params, batch[input_key], train=True, mask=mask,
                            rngs={"dropout": key}, mutable=["batch_stats"])

    def apply(params, batch, key=None):
        if key is None:
            return module.apply(params, batch[input_key], train=False)
        return train_apply(params, batch, key, batch.get(TRAIN_MASK))[0]

    def update_stats(params, batch, weights):
        _, new = train_apply(params, batch, jax.random.key(0), weights > 0)
        return {**params, "batch_stats": new["batch_stats"]}

    return Model(init=init, apply=apply, loss=loss, token_mask=token_mask,
                 update_stats=update_stats)


def per_example_loss(model: Model, params: Params, batch: Batch, key=None) -> jax.Array:
    """[B] losses of `params` on `batch`."""
    return model.loss(model.apply(params, batch, key), batch)


def num_params(params: Params) -> int:
    """Number of scalars in a params pytree."""
    return sum(int(x.size) for x in jax.tree.leaves(params))
