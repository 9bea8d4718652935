"""CFL: its reductions to FedAvg, the naive reference through several splits, the
bipartition against sklearn (released code) and brute force (paper), a real split."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedjax_pfl import models, testing
from fedjax_pfl.algorithms import ALGORITHMS
from fedjax_pfl.algorithms.cfl import bipartition
from fedjax_pfl.data.client_data import ClientData
from fedjax_pfl.testing.naive_cfl import agglomerate, cosines

MODEL = models.mlp((6,), 3, hidden=(8,))
CONFIG = {"batch_size": 4, "client_lr": 0.1}
ALWAYS_SPLIT = {"eps1": 1e3, "eps2": 0.0, "warmup_rounds": 0}


def run(algo, train, rounds):
    state, round_fn, history = algo.init(jax.random.key(0), train), jax.jit(algo.round), []
    for r in range(rounds):
        state, metrics = round_fn(state, train, jax.random.fold_in(jax.random.key(9), r))
        history.append(int(getattr(state, "num_clusters", 1)))
    return state, metrics, history


@pytest.mark.parametrize("never_splits", [
    pytest.param({"eps1": 0.0, "warmup_rounds": 0}, marks=pytest.mark.slow),
    {"max_clusters": 1, **ALWAYS_SPLIT}],
                         ids=["eps1=0", "one slot"])
def test_without_splits_cfl_is_fedavg(tiny_train, tiny_test, never_splits):
    config = {**CONFIG, "local_epochs": 2, "clients_per_round": 5}
    algo = ALGORITHMS["cfl"](MODEL, **{"max_clusters": 2, **config, **never_splits})
    got, got_m, history = run(algo, tiny_train, 3)
    fedavg = ALGORITHMS["fedavg"](MODEL, **config)
    want, want_m, _ = run(fedavg, tiny_train, 3)
    assert history == [1, 1, 1]
    np.testing.assert_array_equal(got.assignment, 0)
    testing.assert_trees_close(jax.tree.map(lambda a: a[0], got.params), want.params,
                               rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got_m["train_loss"], want_m["train_loss"], rtol=1e-5)
    evaluated = algo.evaluate(got, tiny_train, tiny_test)
    np.testing.assert_array_equal(evaluated.pop("model"), 0.0)
    testing.assert_trees_close(evaluated, fedavg.evaluate(want, tiny_train, tiny_test),
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("variant", [
    {"clients_per_round": None},
    {"clients_per_round": 7, "linkage": "single", "weighting": "uniform", "min_split_size": 3}],
    ids=["complete", "single+uniform"])
def test_equals_naive_reference_through_splits(tiny_train, variant):
    """Round 0 warms up; round 1 splits cluster 0; in round 2 both clusters qualify
    and only the first gets the last slot; round 3 has no slot left."""
    config = {**CONFIG, "local_epochs": 2, "max_clusters": 3, **ALWAYS_SPLIT,
              "warmup_rounds": 1, **variant}
    algo = ALGORITHMS["cfl"](MODEL, **config)
    state, round_fn = algo.init(jax.random.key(0), tiny_train), jax.jit(algo.round)
    history = []
    for r in range(4):
        key = jax.random.fold_in(jax.random.key(5), r)
        want, want_m = testing.naive_round("cfl", MODEL, state, tiny_train, key, **config)
        state, metrics = round_fn(state, tiny_train, key)
        testing.assert_trees_close(state, want, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(metrics["train_loss"], want_m["train_loss"], rtol=1e-5)
        history.append(int(state.num_clusters))
    assert history == [1, 2, 3, 3]
    assert set(np.asarray(state.assignment)) == {0, 1, 2}


def _similarities(seed, size):
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(3, 5))
    vectors = centers[rng.integers(0, 3, size)] + rng.normal(scale=0.8, size=(size, 5))
    return cosines(list(vectors))


def _partition(groups):
    return {frozenset(int(i) for i in g) for g in groups}


@pytest.mark.parametrize("linkage", ["complete", "single"])
def test_bipartition_is_agglomerative_clustering_per_cluster(linkage):
    """Every cluster's members split as sklearn splits them on their own (the
    released code's call, on 1 - cos: linkage is shift invariant), and as the naive
    definition; non-members and one-member clusters stay."""
    cluster_sk = pytest.importorskip("sklearn.cluster")
    rng = np.random.default_rng(0)
    for seed in range(4):
        sim = _similarities(seed, 16)
        cluster, member = rng.integers(0, 3, 16), rng.random(16) < 0.8
        cluster[-1], member[-1] = 3, True  # a cluster of one
        moves = np.asarray(bipartition(jnp.asarray(sim, jnp.float32), jnp.asarray(cluster),
                                       jnp.asarray(member), linkage))
        assert not moves[~member].any() and not moves[-1]
        for c in range(3):
            rows = np.flatnonzero((cluster == c) & member)
            if len(rows) < 2:
                assert not moves[rows].any()
                continue
            sub = sim[np.ix_(rows, rows)]
            labels = cluster_sk.AgglomerativeClustering(
                n_clusters=2, metric="precomputed", linkage=linkage).fit(1 - sub).labels_
            want = _partition([rows[labels == 0], rows[labels == 1]])
            assert _partition([rows[~moves[rows]], rows[moves[rows]]]) == want
            assert _partition([rows[g] for g in agglomerate(sub, linkage)]) == want
            assert not moves[rows[0]]  # the first member's group stays


def test_single_linkage_is_the_papers_optimal_bipartition():
    """Single linkage minimises the largest similarity across the two groups (brute force)."""
    for seed in range(5):
        sim = _similarities(seed, 8)
        largest_cross = lambda left, sim=sim: max(sim[i, j] for i in left for j in range(8)
                                                  if j not in left)
        best = min(largest_cross(set(s)) for k in range(1, 8)
                   for s in itertools.combinations(range(8), k))
        moves = np.asarray(bipartition(jnp.asarray(sim, jnp.float32), jnp.zeros(8, jnp.int32),
                                       jnp.ones(8, bool), "single"))
        assert largest_cross(set(np.flatnonzero(~moves))) == pytest.approx(best, abs=1e-6)


def _two_populations(seed):
    """8 clients; odd clients' labels are the even clients' shifted by one class."""
    rng = np.random.default_rng(seed)
    clients = []
    for i in range(8):
        x = rng.normal(size=(24, 6)).astype(np.float32)
        y = np.argmax(x[:, :3], axis=1)
        clients.append({"x": x, "y": ((y + i % 2) % 3).astype(np.int32)})
    return ClientData.from_clients(clients, num_classes=3)


@pytest.mark.slow
def test_two_populations_split_into_their_own_clusters():
    train, test = _two_populations(0), _two_populations(1)
    model = models.logistic_regression((6,), 3)
    config = {"batch_size": 8, "client_lr": 0.3, "max_clusters": 2, "warmup_rounds": 0}
    algo = ALGORITHMS["cfl"](model, eps1=0.1, eps2=0.3, **config)
    state, _, history = run(algo, train, 12)
    assert history[:3] == [1, 1, 1] and history[-1] == 2  # split once the joint model stalls
    np.testing.assert_array_equal(state.assignment, np.arange(8) % 2)
    fedavg, _, _ = run(ALGORITHMS["cfl"](model, eps1=0.0, eps2=0.3, **config), train, 12)
    accuracy = lambda s: float(np.sum(algo.evaluate(s, train, test)["num_correct"]) / (8 * 24))
    assert accuracy(state) > accuracy(fedavg) + 0.2


@pytest.mark.parametrize("kwargs, match", [
    ({"max_clusters": 0}, "^max_clusters:"), ({"max_clusters": 2.0}, "^max_clusters:"),
    ({"max_clusters": True}, "^max_clusters:"), ({"eps1": -0.1}, "^eps1:"),
    ({"eps2": -1.0}, "^eps2:"), ({"eps1": float("nan")}, "^eps1:"),
    ({"warmup_rounds": -1}, "^warmup_rounds:"), ({"min_split_size": 1}, "^min_split_size:"),
    ({"linkage": "average"}, "^linkage:"), ({"weighting": "size"}, "^weighting:")])
def test_argument_errors_name_the_argument(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ALGORITHMS["cfl"](MODEL, **kwargs)  # the factory: before anything compiles
