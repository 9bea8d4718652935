"""Server-side aggregation over the client axis."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax


def safe_div(tree, denominator):
    """`tree / denominator`, or zeros where the denominator is 0."""
    d = jnp.asarray(denominator)
    return jax.tree.map(lambda a: jnp.where(d > 0, a / jnp.where(d > 0, d, 1), 0).astype(a.dtype),
                        tree)


def weighted_delta(client_params, server_params, weight):
    """What one client contributes to a weighted mean of model deltas: (w·Δ, w)."""
    return jax.tree.map(lambda c, s: weight * (c - s), client_params, server_params), weight


def server_update(optimizer: optax.GradientTransformation, params, opt_state, mean_delta):
    """Applies the server optimizer to the pseudo-gradient -mean_delta.

    With `optax.sgd(1.0)` this sets params to params + mean_delta, i.e. the
    (weighted) average of the client models.
    """
    pseudo_grad = jax.tree.map(jnp.negative, mean_delta)
    updates, opt_state = optimizer.update(pseudo_grad, opt_state, params)
    return optax.apply_updates(params, updates), opt_state
