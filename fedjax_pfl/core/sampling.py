"""Cohort sampling under jit, row gathers/scatters and per-client keys.

The cohort size S is static, so every shape is fixed and one compile serves a
whole run. Sampling is without replacement, so scatters have no duplicates.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from fedjax_pfl.data.client_data import ClientData


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
    """Rows `idx` of every [M, ...] leaf: [S, ...] (a `ClientData` takes its clients)."""
    is_data = lambda a: isinstance(a, ClientData)
    return jax.tree.map(lambda a: a.take(idx) if is_data(a) else a[idx], tree, is_leaf=is_data)


def put(tree, idx: jax.Array, rows):
    """Writes [S, ...] `rows` back at `idx`; other rows are left bit-identical."""
    return jax.tree.map(lambda a, r: a.at[idx].set(r), tree, rows)


class Cohort(NamedTuple):
    """One round's cohort: the client ids and whether it is every client.

    With full participation (`full`, static) `take` and `put` skip the gather
    and scatter: a gather with iota indices is not elided by XLA and costs a
    copy of the whole client axis every round.
    """

    ids: jax.Array  # [S] int32, sorted
    full: bool

    def take(self, tree):
        """Rows of the cohort, [S, ...]."""
        return tree if self.full else take(tree, self.ids)

    def put(self, tree, rows):
        """Writes the cohort's rows back; other rows stay bit-identical."""
        return rows if self.full else put(tree, self.ids, rows)


def cohort(key: jax.Array, num_clients: int, cohort_size: int | None) -> Cohort:
    """Samples a round's cohort (see `sample_cohort`)."""
    full = cohort_size is None or cohort_size == num_clients
    return Cohort(sample_cohort(key, num_clients, cohort_size), full)
