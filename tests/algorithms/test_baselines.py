"""SCAFFOLD, HypCluster, FedEM, LG-FedAvg: reductions to FedAvg and their own invariants."""

import jax
import numpy as np

from fedjax_pfl import models, testing
from fedjax_pfl.algorithms import ALGORITHMS

MODEL = models.mlp((6,), 3, hidden=(8,))
CONFIG = {"batch_size": 4, "client_lr": 0.1}


def run(algo, train, rounds, seed=0):
    state = algo.init(jax.random.key(seed), train)
    round_fn = jax.jit(algo.round)
    for r in range(rounds):
        state, metrics = round_fn(state, train, jax.random.fold_in(jax.random.key(9), r))
    return state, metrics


def test_scaffold_with_one_local_step_and_full_participation_is_fedavg(tiny_train):
    """With one step, uniform weights and every client, sum_i (c - c_i) = 0 over the
    clients with data, so the corrections cancel in the average every round."""
    config = {**CONFIG, "local_steps": 1, "weighting": "uniform"}
    got, got_m = run(ALGORITHMS["scaffold"](MODEL, **config), tiny_train, 3)
    want, want_m = run(ALGORITHMS["fedavg"](MODEL, **config), tiny_train, 3)
    testing.assert_trees_close(got.params, want.params, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got_m["train_loss"], want_m["train_loss"], rtol=1e-5)
    assert any(np.abs(np.asarray(a)).max() > 0 for a in jax.tree.leaves(got.control))


def test_scaffold_first_round_is_fedavg_and_c_is_the_mean_of_the_c_i(tiny_train):
    config = {**CONFIG, "local_epochs": 2, "clients_per_round": 5}
    algo = ALGORITHMS["scaffold"](MODEL, **config)
    one, _ = run(algo, tiny_train, 1)  # c = c_i = 0: no correction yet
    fedavg, _ = run(ALGORITHMS["fedavg"](MODEL, **config, weighting="uniform"), tiny_train, 1)
    testing.assert_trees_close(one.params, fedavg.params, rtol=1e-5, atol=1e-6)
    state, _ = run(algo, tiny_train, 4)
    has_data = np.asarray(tiny_train.num_examples) > 0
    for c, c_i in zip(jax.tree.leaves(state.control), jax.tree.leaves(state.client_control)):
        np.testing.assert_allclose(c, np.asarray(c_i)[has_data].mean(0), atol=1e-6)
        np.testing.assert_array_equal(np.asarray(c_i)[~has_data], 0.0)
