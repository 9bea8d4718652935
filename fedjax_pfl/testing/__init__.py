"""Test helpers: plain per-client reference loops, a smoke checker, tiny fixtures.

`naive_round(name, model, state, train, key, **config)` recomputes one round
of a registered algorithm the slow, obvious way: a Python loop over the
cohort, one client at a time, each client's local training a Python loop over
its minibatches with plain SGD written out (`local_reference`), and the
aggregation written out in float64 NumPy. The vectorized round must match it;
that proves vmap / chunking / sharding, the local trainer, the parameter splits
and the aggregation maths correct.

The references are independent of the code they check: no module here imports
`core.local`, `core.partial`, `core.params`, `core.metagrad`, `core.finetune`,
`core.kmodels` or `fedjax_pfl.algorithms` (a test parses the sources to keep it
so). They share with the package only the randomness contract (cohort sampling
and client keys from `core.sampling`, minibatch draws re-derived from
`jax.random`, see `local_reference`) and the model (`Model`). The references
live in one module per algorithm family (`naive_*.py`), register in
`NAIVE_ROUNDS` (evaluations that fine-tune first also in `NAIVE_EVALUATES`,
run by `naive_evaluate`) and state the factory defaults they read in `DEFAULTS`.
"""

from __future__ import annotations

import jax

from fedjax_pfl.data.client_data import ClientData
from fedjax_pfl.models.model import Model
from fedjax_pfl.testing import (
    naive_baselines,
    naive_cfl,
    naive_fedavg,
    naive_fedbn,
    naive_kmodels,
    naive_meta,
    naive_partial,
)
from fedjax_pfl.testing.common import (
    assert_trees_close,
    check_algorithm_does_not_smoke,
    client_row,
    random_client_data,
)

NAIVE_ROUNDS = {
    **naive_fedavg.NAIVE_ROUNDS,
    **naive_kmodels.NAIVE_ROUNDS,
    **naive_partial.NAIVE_ROUNDS,
    **naive_meta.NAIVE_ROUNDS,
    **naive_baselines.NAIVE_ROUNDS,
    **naive_cfl.NAIVE_ROUNDS,
    **naive_fedbn.NAIVE_ROUNDS,
}

# Naive references of `evaluate`, where an algorithm's evaluation does more than
# testing stored models (fine-tuning first).
NAIVE_EVALUATES = {
    **naive_meta.NAIVE_EVALUATES,
}

DEFAULTS = {
    **naive_fedavg.DEFAULTS,
    **naive_kmodels.DEFAULTS,
    **naive_partial.DEFAULTS,
    **naive_meta.DEFAULTS,
    **naive_baselines.DEFAULTS,
    **naive_cfl.DEFAULTS,
    **naive_fedbn.DEFAULTS,
}


def resolved_config(name: str, **config) -> dict:
    """`config` over the factory defaults (of the arguments the reference reads)."""
    if name not in DEFAULTS:
        raise KeyError(f"name: no naive reference for {name!r}; known: {sorted(DEFAULTS)}.")
    return {**DEFAULTS[name], **config}


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


def naive_evaluate(name: str, model: Model, state, train: ClientData, test: ClientData,
                   **config) -> dict:
    """`algorithm.evaluate` of algorithm `name` as a plain per-client Python loop.

    Args:
      name: a key of `ALGORITHMS` with a reference in `NAIVE_EVALUATES`.
      model, state, train, test: as for `algorithm.evaluate`.
      **config: the keyword arguments the algorithm was built with.

    Returns:
      The per-client statistics [M] (NumPy) the reference computes.
    """
    if name not in NAIVE_EVALUATES:
        raise KeyError(f"name: no naive evaluation for {name!r}; known: "
                       f"{sorted(NAIVE_EVALUATES)}.")
    return NAIVE_EVALUATES[name](model, state, train, test, resolved_config(name, **config))


__all__ = [
    "DEFAULTS",
    "NAIVE_EVALUATES",
    "NAIVE_ROUNDS",
    "assert_trees_close",
    "check_algorithm_does_not_smoke",
    "client_row",
    "naive_evaluate",
    "naive_round",
    "random_client_data",
    "resolved_config",
]
