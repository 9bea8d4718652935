"""Helpers of algorithms with K models (IFCA, FedFew): per-model losses, best-of-K."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from fedjax_pfl.core import execution as ex
from fedjax_pfl.core import local
from fedjax_pfl.models.model import Model


def train_losses(model: Model, params, data) -> jax.Array:
    """[K] mean loss of each of the stacked models on ONE client's data (eval mode)."""
    stats = jax.vmap(lambda p: local.evaluate_client(model, p, data))(params)
    return stats["loss_sum"] / jnp.maximum(stats["num_examples"], 1.0)


def evaluate_best(model: Model, params, train_row, test_row) -> dict[str, jax.Array]:
    """ONE client's test statistics with the model of lowest training loss, and the
    choice as `model` (float32)."""
    choice = jnp.argmin(train_losses(model, params, train_row))
    chosen = jax.tree.map(lambda a: a[choice], params)
    return {**local.evaluate_client(model, chosen, test_row), "model": choice.astype(jnp.float32)}


def evaluate_best_of(model: Model, params, train, test, execution: ex.Execution):
    """Per-client [M] `evaluate_best` of the K stacked models `params`."""
    return ex.map_clients(lambda p, x: evaluate_best(model, p, *x), params, (train, test),
                          execution)
