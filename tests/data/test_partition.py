"""Property tests of the host-side partitioners."""

import numpy as np
import pytest

from fedjax_pfl.data import partition as P

SEEDS = [0, 1, 7]


def _labels(n, num_classes=10, seed=123, balanced=True):
    rng = np.random.default_rng(seed)
    if balanced:
        return rng.permutation(np.arange(n) % num_classes)
    weights = rng.dirichlet(np.ones(num_classes))
    return rng.choice(num_classes, size=n, p=weights)


def _assert_exact_cover(parts, n, num_clients):
    assert len(parts) == num_clients
    assert all(isinstance(p, np.ndarray) and p.dtype == np.int64 and p.ndim == 1 for p in parts)
    np.testing.assert_array_equal(np.sort(np.concatenate(parts)), np.arange(n))


def _mean_entropy(labels, parts, num_classes=10):
    out = []
    for p in parts:
        h = np.bincount(labels[p], minlength=num_classes) / len(p)
        h = h[h > 0]
        out.append(-(h * np.log(h)).sum())
    return float(np.mean(out))


def _cv(parts):
    sizes = np.array([len(p) for p in parts], dtype=float)
    return sizes.std() / sizes.mean()


CASES = [
    ("iid", {}),
    ("dirichlet", {"alpha": 0.3}),
    ("dirichlet", {"alpha": 10.0}),
    ("pathological", {"classes_per_client": 2}),
    ("quantity_skew", {}),
    ("quantity_skew", {"distribution": "power_law", "exponent": 1.2}),
]


@pytest.mark.parametrize("name,kwargs", CASES)
@pytest.mark.parametrize("n,num_clients", [(1000, 10), (2003, 37), (600, 20)])
@pytest.mark.parametrize("seed", SEEDS)
def test_every_example_assigned_exactly_once(name, kwargs, n, num_clients, seed):
    labels = _labels(n, balanced=(seed % 2 == 0), seed=seed)
    parts = P.PARTITIONS[name](labels, num_clients, seed=seed, **kwargs)
    _assert_exact_cover(parts, n, num_clients)


@pytest.mark.parametrize("name,kwargs", CASES)
def test_same_seed_same_partition_and_different_seed_differs(name, kwargs):
    labels = _labels(1000)
    a = P.PARTITIONS[name](labels, 20, seed=3, **kwargs)
    b = P.PARTITIONS[name](labels, 20, seed=3, **kwargs)
    c = P.PARTITIONS[name](labels, 20, seed=4, **kwargs)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not all(np.array_equal(x, y) for x, y in zip(a, c))


def test_iid_near_equal_sizes():
    sizes = [len(p) for p in P.iid(np.zeros(1003), 10, seed=0)]
    assert max(sizes) - min(sizes) <= 1


@pytest.mark.parametrize("seed", SEEDS)
def test_dirichlet_skew_visible_in_label_entropy(seed):
    labels = _labels(5000)
    low = _mean_entropy(labels, P.dirichlet(labels, 20, alpha=0.1, seed=seed))
    high = _mean_entropy(labels, P.dirichlet(labels, 20, alpha=100.0, seed=seed))
    flat = _mean_entropy(labels, P.iid(labels, 20, seed=seed))
    assert low < 0.6 * high
    assert low < 0.6 * flat
    assert high > 0.9 * np.log(10)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("min_samples", [None, 0, 25])
def test_dirichlet_min_samples_respected(seed, min_samples):
    labels = _labels(2000)
    parts = P.dirichlet(labels, 20, alpha=0.5, seed=seed, min_samples=min_samples)
    least = 10 if min_samples is None else min_samples
    assert min(len(p) for p in parts) >= least


def test_dirichlet_cap_limits_client_growth():
    labels = _labels(5000)
    parts = P.dirichlet(labels, 10, alpha=0.1, seed=0)
    # A client may cross N/K only with the class that takes it over the cap.
    assert max(len(p) for p in parts) <= 500 + max(np.bincount(labels))


def test_dirichlet_gives_up_with_actionable_message():
    labels = _labels(500, num_classes=2)
    with pytest.raises(ValueError, match="max_tries=5.*alpha.*min_samples"):
        P.dirichlet(labels, 50, alpha=0.01, seed=0, min_samples=5, max_tries=5)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("c", [1, 2, 3])
@pytest.mark.parametrize("balanced", [True, False])
def test_pathological_at_most_c_classes(seed, c, balanced):
    labels = _labels(3000, balanced=balanced, seed=seed)
    parts = P.pathological(labels, 30, classes_per_client=c, seed=seed)
    _assert_exact_cover(parts, 3000, 30)
    assert max(len(np.unique(labels[p])) for p in parts) <= c
    assert _mean_entropy(labels, parts) < 0.7 * np.log(10)


def test_pathological_fedavg_shard_sizes():
    labels = np.repeat(np.arange(10), 600)
    parts = P.pathological(labels, 100, classes_per_client=2, seed=0)
    assert {len(p) for p in parts} == {60}


def test_pathological_too_few_shards_still_covers():
    labels = _labels(1000)
    parts = P.pathological(labels, 3, classes_per_client=2, seed=0)
    _assert_exact_cover(parts, 1000, 3)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("distribution", ["lognormal", "power_law"])
def test_quantity_skew_sizes_vary_labels_do_not(seed, distribution):
    labels = _labels(5000)
    parts = P.quantity_skew(labels, 50, seed=seed, distribution=distribution, min_samples=5)
    assert _cv(parts) > 0.5
    assert _cv(parts) > 20 * _cv(P.iid(labels, 50, seed=seed))
    assert min(len(p) for p in parts) >= 5
    big = [p for p in parts if len(p) >= 200]
    assert _mean_entropy(labels, big) > 0.9 * np.log(10)


def test_quantity_skew_larger_sigma_more_skew():
    labels = _labels(20000)
    cvs = [np.mean([_cv(P.quantity_skew(labels, 100, seed=s, sigma=sig)) for s in SEEDS])
           for sig in (0.3, 2.0)]
    assert cvs[0] < cvs[1]


def test_natural_groups_by_id_in_sorted_order():
    ids = np.array(["b", "a", "c", "a", "b", "b"])
    parts = P.natural(ids)
    assert [p.tolist() for p in parts] == [[1, 3], [0, 4, 5], [2]]
    assert all(p.dtype == np.int64 for p in parts)
    ids = np.random.default_rng(0).integers(0, 50, 1000)
    parts = P.natural(ids)
    _assert_exact_cover(parts, 1000, len(np.unique(ids)))
    assert all(len(np.unique(ids[p])) == 1 for p in parts)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("fraction", [0.1, 0.5, 0.75, 0.95])
def test_train_test_split_disjoint_and_complete(seed, fraction):
    labels = _labels(1500)
    parts = P.quantity_skew(labels, 40, seed=seed) + [np.array([], np.int64), np.array([7])]
    train, test = P.train_test_split(parts, train_fraction=fraction, seed=seed)
    assert len(train) == len(test) == len(parts)
    for p, tr, te in zip(parts, train, test):
        assert tr.dtype == te.dtype == np.int64
        assert not set(tr.tolist()) & set(te.tolist())
        np.testing.assert_array_equal(np.sort(np.concatenate([tr, te])), np.sort(p))
        if len(p) >= 2:
            assert len(tr) >= 1 and len(te) >= 1
        if len(p) >= 20:
            assert abs(len(tr) / len(p) - fraction) <= 0.05 + 1 / len(p)
    assert train[-1].tolist() == [7] and test[-1].size == 0
    assert train[-2].size == test[-2].size == 0
    again = P.train_test_split(parts, train_fraction=fraction, seed=seed)
    assert all(np.array_equal(a, b) for a, b in zip(train, again[0]))


@pytest.mark.parametrize("call,match", [
    (lambda y: P.dirichlet(y, 10, alpha=0.0), "alpha"),
    (lambda y: P.dirichlet(y, 10, alpha=-1.0), "alpha"),
    (lambda y: P.dirichlet(y, 10, alpha=1.0, min_samples=11), "min_samples"),
    (lambda y: P.iid(y, 0), "num_clients"),
    (lambda y: P.iid(y, 101), "num_clients"),
    (lambda y: P.quantity_skew(y, 200), "num_clients"),
    (lambda y: P.pathological(y, 10, classes_per_client=0), "classes_per_client"),
    (lambda y: P.pathological(y, 10, classes_per_client=6), "classes_per_client"),
    (lambda y: P.pathological(y, 60, classes_per_client=2), "classes_per_client"),
    (lambda y: P.quantity_skew(y, 10, distribution="zipf"), "distribution"),
    (lambda y: P.quantity_skew(y, 10, sigma=0.0), "sigma"),
    (lambda y: P.quantity_skew(y, 10, distribution="power_law", exponent=0), "exponent"),
    (lambda y: P.quantity_skew(y, 10, min_samples=11), "min_samples"),
    (lambda y: P.train_test_split([y], train_fraction=1.0), "train_fraction"),
    (lambda y: P.train_test_split([y], train_fraction=0.0), "train_fraction"),
    (lambda y: P.iid(y.reshape(10, 10), 2), "labels"),
    (lambda y: P.iid(y[:0], 1), "labels"),
])
def test_bad_arguments_name_the_argument(call, match):
    with pytest.raises(ValueError, match=match):
        call(np.arange(100) % 5)


def test_registry():
    assert set(P.PARTITIONS) == {"iid", "dirichlet", "pathological", "quantity_skew"}
