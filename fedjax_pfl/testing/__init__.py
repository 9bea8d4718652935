"""Test helpers: plain per-client reference loops, a smoke checker, tiny fixtures.

`naive_round(name, model, state, train, key, **config)` recomputes one round
of a registered algorithm the slow, obvious way: a Python loop over the
cohort, one client at a time (each client's local training is unvectorized
and jitted alone), and the aggregation written out in float64 NumPy. The
vectorized round must match it; that is what proves vmap / chunking /
sharding and the aggregation maths correct. The references live in one module
per algorithm family (`naive_*.py`) and register in `NAIVE_ROUNDS`.
"""

from __future__ import annotations

import jax

from fedjax_pfl.data.client_data import ClientData
from fedjax_pfl.models.model import Model
from fedjax_pfl.testing import naive_fedavg, naive_kmodels, naive_meta, naive_partial
from fedjax_pfl.testing.common import (
    assert_trees_close,
    check_algorithm_does_not_smoke,
    client_row,
    random_client_data,
    resolved_config,
)

NAIVE_ROUNDS = {
    **naive_fedavg.NAIVE_ROUNDS,
    **naive_kmodels.NAIVE_ROUNDS,
    **naive_partial.NAIVE_ROUNDS,
    **naive_meta.NAIVE_ROUNDS,
}


def naive_round(name: str, model: Model, state, train: ClientData, key: jax.Array, **config):
    """One round of algorithm `name` as a plain per-client Python loop.

    Args:
      name: a key of `ALGORITHMS` with a reference in `NAIVE_ROUNDS`.
      model: the model the algorithm was built with.
      state: the state before the round.
      train: the training data.
      key: the round key (as passed to `algorithm.round`).
      **config: the keyword arguments the algorithm was built with.

    Returns:
      (new state, round metrics), to compare with `algorithm.round`.
    """
    if name not in NAIVE_ROUNDS:
        raise KeyError(f"name: no naive reference for {name!r}; known: {sorted(NAIVE_ROUNDS)}.")
    return NAIVE_ROUNDS[name](model, state, train, key, resolved_config(name, **config))



__all__ = [
    "NAIVE_ROUNDS",
    "assert_trees_close",
    "check_algorithm_does_not_smoke",
    "client_row",
    "naive_round",
    "random_client_data",
    "resolved_config",
]
