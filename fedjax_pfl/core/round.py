"""The opening of every round: checks, the cohort (sampled or given), its data and keys.

Every algorithm's `round(state, train, key, cohort=None)` starts with
`round_lib.start(...)`: the cohort is sampled from the round key (the
full-participation fast path when every client takes part), or is the given
`cohort` of client ids (a replayed schedule, see `simulate(cohorts=...)`).
Client c's key is `fold_in(fold_in(key, 1), c)` either way.
"""


from typing import NamedTuple

import jax
import jax.numpy as jnp

from fedjax_pfl.core import algorithm, sampling
from fedjax_pfl.data.client_data import ClientData


class Start(NamedTuple):
    """A round's cohort, its clients' data [S, ...], keys [S] and example counts [S] (float32)."""

    cohort: sampling.Cohort
    data: ClientData
    keys: jax.Array
    n: jax.Array


def cohort_size(num_clients: int, clients_per_round: int | None) -> int:
    return num_clients if clients_per_round is None else clients_per_round


def start(key: jax.Array, train: ClientData, clients_per_round: int | None,
          cohort: jax.Array | None = None, *, state_clients: int | None = None) -> Start:
    """Checks `train` and opens the round.

    Args:
      key: the round key.
      train: every client's data [M, ...].
      clients_per_round: the algorithm's S (None: all M).
      cohort: None to sample, or the round's client ids, int [S] (distinct, in
        [0, M); `simulate` checks the values, this the shape).
      state_clients: the M of the state's per-client leaves, if any.
    """
    algorithm.check_train(train, clients_per_round)
    if state_clients is not None:
        algorithm.check_same_clients(state_clients, train, "train")
    sample_key, client_key = sampling.round_keys(key)
    size = cohort_size(train.num_clients, clients_per_round)
    if cohort is None:
        chosen = sampling.cohort(sample_key, train.num_clients, clients_per_round)
    else:
        if jnp.shape(cohort) != (size,) or not jnp.issubdtype(jnp.asarray(cohort).dtype,
                                                                jnp.integer):
            raise ValueError(f"cohort: expected {size} int client ids (clients_per_round), got "
                             f"shape {jnp.shape(cohort)} of {jnp.asarray(cohort).dtype}.")
        chosen = sampling.Cohort(jnp.asarray(cohort, jnp.int32), False)
    data = chosen.take(train)
    return Start(chosen, data, sampling.client_keys(client_key, chosen.ids),
                 data.num_examples.astype(jnp.float32))


def mean_loss(losses: jax.Array, n: jax.Array) -> jax.Array:
    """The cohort's train loss: the mean of the clients' losses weighted by n_i."""
    return jnp.sum(n * losses) / jnp.maximum(jnp.sum(n), 1.0)


def num_clients_of(tree) -> int:
    """M of a state's per-client leaves [M, ...]."""
    return jax.tree.leaves(tree)[0].shape[0]


def replicate(tree, num: int):
    """`num` copies of every leaf on a new leading axis (per-client or per-model state)."""
    return jax.tree.map(lambda a: jnp.broadcast_to(a, (num,) + jnp.shape(a)), tree)
