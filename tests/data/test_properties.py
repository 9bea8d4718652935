"""Property-based tests (hypothesis) of `ClientData.from_clients` and every partitioner."""

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from fedjax_pfl import validation
from fedjax_pfl.data import (
    PARTITIONS,
    ClientData,
    dirichlet,
    iid,
    natural,
    pathological,
    quantity_skew,
    train_test_split,
)

FAST = settings(max_examples=15, deadline=None)

labels_st = st.integers(1, 6).flatmap(
    lambda classes: st.lists(st.integers(0, classes - 1), min_size=2, max_size=80)).map(np.array)
seed_st = st.integers(0, validation.SEED_MAX)


def _assert_exact_cover(parts, n):
    """Every index in [0, n) appears in exactly one part; parts are int64."""
    assert all(p.dtype == np.int64 for p in parts)
    flat = np.concatenate(parts) if parts else np.zeros(0, np.int64)
    np.testing.assert_array_equal(np.sort(flat), np.arange(n))


@FAST
@given(labels=labels_st, data=st.data(), seed=seed_st)
def test_iid_is_an_exact_balanced_cover(labels, data, seed):
    k = data.draw(st.integers(1, labels.size))
    parts = iid(labels, k, seed=seed)
    assert len(parts) == k
    _assert_exact_cover(parts, labels.size)
    sizes = [p.size for p in parts]
    assert max(sizes) - min(sizes) <= 1


@FAST
@given(labels=labels_st, data=st.data(), seed=seed_st,
       alpha=st.floats(0.05, 100.0, allow_nan=False))
def test_dirichlet_is_an_exact_cover_with_min_samples(labels, data, seed, alpha):
    k = data.draw(st.integers(1, max(1, labels.size // 2)))
    parts = dirichlet(labels, k, alpha=alpha, seed=seed, min_samples=0)
    assert len(parts) == k
    _assert_exact_cover(parts, labels.size)


@FAST
@given(labels=labels_st, data=st.data(), seed=seed_st)
def test_pathological_is_an_exact_cover_with_few_classes(labels, data, seed):
    classes = np.unique(labels).size
    c = data.draw(st.integers(1, classes))
    k = data.draw(st.integers(1, max(1, labels.size // c)))
    parts = pathological(labels, k, classes_per_client=c, seed=seed)
    assert len(parts) == k
    _assert_exact_cover(parts, labels.size)
    assert all(p.size >= 1 for p in parts)
    if k * c >= classes:  # shards never straddle classes
        assert all(np.unique(labels[p]).size <= c for p in parts)


@FAST
@given(labels=labels_st, data=st.data(), seed=seed_st,
       distribution=st.sampled_from(["lognormal", "power_law"]))
def test_quantity_skew_is_an_exact_cover_with_min_samples(labels, data, seed, distribution):
    k = data.draw(st.integers(1, labels.size))
    least = data.draw(st.integers(0, labels.size // k))
    parts = quantity_skew(labels, k, seed=seed, distribution=distribution, min_samples=least)
    assert len(parts) == k
    _assert_exact_cover(parts, labels.size)
    assert min(p.size for p in parts) >= least


@FAST
@given(ids=st.lists(st.integers(0, 9), min_size=1, max_size=60).map(np.array))
def test_natural_groups_by_id(ids):
    parts = natural(ids)
    assert len(parts) == np.unique(ids).size
    _assert_exact_cover(parts, ids.size)
    for part, value in zip(parts, np.unique(ids)):
        assert np.all(ids[part] == value) and np.all(np.diff(part) > 0)


@FAST
@given(sizes=st.lists(st.integers(0, 30), min_size=1, max_size=8), seed=seed_st,
       fraction=st.floats(0.01, 0.99))
def test_train_test_split_has_no_overlap(sizes, seed, fraction):
    parts = np.split(np.arange(sum(sizes)), np.cumsum(sizes)[:-1])
    train, test = train_test_split(parts, train_fraction=fraction, seed=seed)
    for part, tr, te in zip(parts, train, test):
        assert np.intersect1d(tr, te).size == 0
        np.testing.assert_array_equal(np.sort(np.concatenate([tr, te])), part)
        if part.size >= 2:
            assert tr.size >= 1 and te.size >= 1
        else:
            assert tr.size == part.size


@FAST
@given(name=st.sampled_from(sorted(PARTITIONS)), seed=seed_st,
       labels=st.lists(st.integers(0, 3), min_size=8, max_size=60).map(np.array))
def test_every_registered_partition_then_split_assigns_each_example_once(name, seed, labels):
    kwargs = {"dirichlet": {"alpha": 0.5, "min_samples": 0},
              "pathological": {"classes_per_client": 1}}.get(name, {})
    parts = PARTITIONS[name](labels, 2, seed=seed, **kwargs)
    train, test = train_test_split(parts, seed=seed)
    _assert_exact_cover(train + test, labels.size)


client_st = st.integers(0, 12).flatmap(lambda n: st.fixed_dictionaries({
    "x": st.lists(st.floats(-1e6, 1e6, width=32), min_size=2 * n, max_size=2 * n)
    .map(lambda v: np.asarray(v, np.float32).reshape(-1, 2)),
    "y": st.lists(st.integers(0, 4), min_size=n, max_size=n).map(
        lambda v: np.asarray(v, np.int32)),
}))


@FAST
@given(clients=st.lists(client_st, min_size=1, max_size=6), pad=st.integers(0, 3))
def test_from_clients_stacks_padding_and_counts(clients, pad):
    counts = [c["y"].size for c in clients]
    if sum(counts) == 0:
        return
    n = max(counts) + pad
    data = ClientData.from_clients(clients, num_classes=5, max_examples=n)
    examples = {k: np.asarray(v) for k, v in data.examples.items()}
    assert data.num_clients == len(clients) and data.max_examples == n
    np.testing.assert_array_equal(np.asarray(data.num_examples), counts)
    assert all(v.shape[:2] == (len(clients), n) for v in examples.values())
    real = np.arange(n)[None, :] < np.asarray(counts)[:, None]
    for k, v in examples.items():
        for i, client in enumerate(clients):
            np.testing.assert_array_equal(v[i, : counts[i]], client[k])
        assert not np.any(v[~real])  # padding rows are zeros


def test_from_clients_output_passes_the_client_data_checks():
    clients = [{"x": np.ones((n, 2), np.float32), "y": np.zeros(n, np.int32)} for n in (0, 3, 1)]
    validation.check_client_data(ClientData.from_clients(clients), "data")
