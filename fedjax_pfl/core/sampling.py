"""Cohort sampling under jit, row gathers/scatters and per-client keys.

The cohort size S is static, so every shape is fixed and one compile serves a
whole run. Sampling is without replacement, so scatters have no duplicates.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def sample_cohort(key: jax.Array, num_clients: int, cohort_size: int | None) -> jax.Array:
    """Client ids of one round's cohort: [S] int32.

    Args:
      key: the round's sampling key.
      num_clients: M.
      cohort_size: S, or None for full participation (then the ids are
        0..M-1 in order and no randomness is used).
    """
    if cohort_size is None or cohort_size == num_clients:
        return jnp.arange(num_clients, dtype=jnp.int32)
    ids = jax.random.choice(key, num_clients, (cohort_size,), replace=False)
    return jnp.sort(ids).astype(jnp.int32)


def client_keys(key: jax.Array, client_ids: jax.Array) -> jax.Array:
    """[S] keys: `fold_in(key, id)`, so a client's randomness depends on its id only."""
    return jax.vmap(jax.random.fold_in, in_axes=(None, 0))(key, client_ids)


def round_keys(key: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Splits a round key into (cohort-sampling key, base key for client keys)."""
    return jax.random.fold_in(key, 0), jax.random.fold_in(key, 1)


def take(tree, idx: jax.Array):
    """Rows `idx` of every [M, ...] leaf: [S, ...]."""
    return jax.tree.map(lambda a: a[idx], tree)


def put(tree, idx: jax.Array, rows):
    """Writes [S, ...] `rows` back at `idx`; other rows are left bit-identical."""
    return jax.tree.map(lambda a, r: a.at[idx].set(r), tree, rows)
