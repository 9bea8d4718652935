"""`Model`: a model as a triple of pure functions.

The triple hides the neural-network library: the engine only calls
`init(key) -> params`, `apply(params, batch, key) -> logits` and
`loss(logits, batch) -> per-example loss`. Because these are plain functions,
`jax.vmap(model.init)(keys)` stacks K or M independent models.
"""

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

Params = Any
Batch = dict[str, jax.Array]


class Model(NamedTuple):
    """A model as pure functions.

    Attributes:
      init: `init(key) -> params`, a pytree of arrays for ONE model.
      apply: `apply(params, batch, key) -> logits [B, C]`; `key` is None at
        evaluation and a fresh key per step in training (for dropout).
      loss: `loss(logits, batch) -> [B]` per-example loss.
    """

    init: Callable[[jax.Array], Params]
    apply: Callable[[Params, Batch, jax.Array | None], jax.Array]
    loss: Callable[[jax.Array, Batch], jax.Array]


def cross_entropy(logits: jax.Array, batch: Batch) -> jax.Array:
    """Softmax cross-entropy against integer labels `batch["y"]`: [B]."""
    return optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"])


def from_linen(
    module: nn.Module,
    input_shape: Sequence[int],
    *,
    input_key: str = "x",
    loss: Callable[[jax.Array, Batch], jax.Array] = cross_entropy,
) -> Model:
    """Wraps a flax.linen module mapping `batch[input_key]` [B, *input_shape] to logits.

    Args:
      module: a linen module whose `__call__(x, train)` returns logits.
      input_shape: the shape of ONE example (no batch axis).
      input_key: the batch field fed to the module.
      loss: per-example loss on (logits, batch).
    """
    dummy = jnp.zeros((1, *input_shape), jnp.float32)

    def init(key):
        return module.init(key, dummy, train=False)["params"]

    def apply(params, batch, key=None):
        rngs = None if key is None else {"dropout": key}
        return module.apply({"params": params}, batch[input_key], train=key is not None, rngs=rngs)

    return Model(init=init, apply=apply, loss=loss)


def per_example_loss(model: Model, params: Params, batch: Batch, key=None) -> jax.Array:
    """[B] losses of `params` on `batch`."""
    return model.loss(model.apply(params, batch, key), batch)


def num_params(params: Params) -> int:
    """Number of scalars in a params pytree."""
    return sum(int(x.size) for x in jax.tree.leaves(params))
