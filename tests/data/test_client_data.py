"""Tests of `ClientData.from_clients` validation, padding and client selection."""

import re

import jax.numpy as jnp
import numpy as np
import pytest

from fedjax_pfl.data import ClientData


def _client(n, num_features=3, num_classes=4, seed=0):
    rng = np.random.default_rng(seed)
    return {"x": rng.normal(size=(n, num_features)).astype(np.float32),
            "y": rng.integers(0, num_classes, n).astype(np.int32)}


def _three():
    return [_client(3, seed=0), _client(1, seed=1), _client(0, seed=2)]


def _with(index, **fields):
    clients = [_client(4, seed=0), _client(4, seed=1)]
    clients[index] = {**clients[index], **fields}
    return clients


def _drop(index, key):
    clients = [_client(4, seed=0), _client(4, seed=1)]
    del clients[index][key]
    return clients


BAD = [
    ("ragged lengths", lambda: _with(1, y=np.zeros(3, np.int32)), r"clients\[1\].*'x'.*'y'"),
    ("missing field", lambda: _drop(1, "y"), r"clients\[1\].*fields \['x'\]"),
    ("extra field", lambda: _with(1, z=np.zeros(4, np.float32)), r"clients\[1\].*'z'"),
    ("label too large", lambda: _with(1, y=np.array([0, 1, 2, 4], np.int32)),
     r"clients\[1\]\['y'\].*\[0, 4\)"),
    ("negative label", lambda: _with(0, y=np.array([0, -1, 2, 3], np.int32)),
     r"clients\[0\]\['y'\]"),
    ("NaN feature", lambda: _with(1, x=np.full((4, 3), np.nan, np.float32)),
     r"clients\[1\]\['x'\].*NaN"),
    ("Inf feature", lambda: _with(1, x=np.full((4, 3), np.inf, np.float32)),
     r"clients\[1\]\['x'\].*Inf"),
    ("dtype mismatch", lambda: _with(1, x=np.zeros((4, 3), np.float64)),
     r"clients\[1\]\['x'\].*dtype float64"),
    ("float labels", lambda: [{**c, "y": c["y"].astype(np.float32)} for c in _with(0)],
     r"clients\[0\]\['y'\].*integers"),
    ("string features", lambda: [{**c, "x": np.array(["a"] * 4)} for c in _with(0)],
     r"clients\[0\]\['x'\].*numeric"),
    ("trailing shape", lambda: _with(1, x=np.zeros((4, 5), np.float32)),
     r"clients\[1\]\['x'\].*trailing shape"),
    ("scalar field", lambda: _with(1, x=np.float32(1.0)), r"clients\[1\]\['x'\].*scalar"),
]


@pytest.mark.parametrize("name,make,match", BAD, ids=[b[0] for b in BAD])
def test_validation_errors_name_client_and_field(name, make, match):
    with pytest.raises(ValueError, match=match):
        ClientData.from_clients(make(), num_classes=4)


def test_empty_dataset_errors():
    with pytest.raises(ValueError, match="clients.*empty"):
        ClientData.from_clients([])
    with pytest.raises(ValueError, match="every client has 0 examples"):
        ClientData.from_clients([_client(0), _client(0, seed=1)])
    with pytest.raises(ValueError, match=re.escape("clients[0]") + ".*field"):
        ClientData.from_clients([{}])


def test_max_examples_argument():
    data = ClientData.from_clients(_three(), max_examples=6)
    assert data.max_examples == 6
    with pytest.raises(ValueError, match="max_examples.*3"):
        ClientData.from_clients(_three(), max_examples=2)


def test_zero_example_clients_padding_and_mask():
    clients = _three()
    data = ClientData.from_clients(clients, num_classes=4)
    assert data.num_clients == 3 and data.max_examples == 3
    assert data.examples["x"].shape == (3, 3, 3) and data.examples["y"].shape == (3, 3)
    assert data.num_examples.dtype == jnp.int32
    np.testing.assert_array_equal(np.asarray(data.num_examples), [3, 1, 0])
    np.testing.assert_array_equal(np.asarray(data.mask()),
                                  [[1, 1, 1], [1, 0, 0], [0, 0, 0]])
    assert data.padding_ratio() == pytest.approx(1 - 4 / 9)
    assert np.all(np.asarray(data.examples["x"])[1, 1:] == 0)
    for m, c in enumerate(clients):
        got = data.client_arrays(m)
        np.testing.assert_array_equal(got["x"], c["x"])
        np.testing.assert_array_equal(got["y"], c["y"])


def test_host_dtypes_become_device_dtypes():
    clients = [{"x": np.ones((2, 2)), "y": np.array([0, 1])}]
    data = ClientData.from_clients(clients, num_classes=2)
    assert data.examples["x"].dtype == jnp.float32
    assert data.examples["y"].dtype == jnp.int32


def test_take_selects_clients():
    data = ClientData.from_clients(_three(), num_classes=4)
    sub = data.take(jnp.array([2, 0]))
    assert sub.num_clients == 2 and sub.max_examples == 3
    np.testing.assert_array_equal(np.asarray(sub.num_examples), [0, 3])
    np.testing.assert_array_equal(np.asarray(sub.examples["x"][1]),
                                  np.asarray(data.examples["x"][0]))


def test_pad_clients_and_examples():
    data = ClientData.from_clients(_three(), num_classes=4)
    more = data.pad_clients(5)
    assert more.num_clients == 5
    np.testing.assert_array_equal(np.asarray(more.num_examples), [3, 1, 0, 0, 0])
    wider = data.pad_examples(7)
    assert wider.max_examples == 7 and wider.examples["y"].shape == (3, 7)
    assert wider.padding_ratio() == pytest.approx(1 - 4 / 21)
    with pytest.raises(ValueError, match="num_clients"):
        data.pad_clients(2)
    with pytest.raises(ValueError, match="max_examples"):
        data.pad_examples(2)


@pytest.mark.parametrize("shape", [(1000, 7), (13, 5, 3), (1, 4)])
def test_nonfinite_count_in_blocks_matches_numpy(shape):
    # Stores are checked in blocks (no int32 copy of the whole store); the last
    # block overlaps its predecessor. Every NaN/Inf is counted once, per row.
    from fedjax_pfl import validation

    rng = np.random.default_rng(0)
    x = rng.normal(size=shape).astype(np.float32)
    x.flat[rng.choice(x.size, max(1, x.size // 9), replace=False)] = np.nan
    x.flat[rng.choice(x.size, max(1, x.size // 11), replace=False)] = np.inf
    want = np.sum(~np.isfinite(x), axis=tuple(range(1, x.ndim)))
    for block_values in (1, 50, 2**24):
        got = np.asarray(validation._count_nonfinite(jnp.asarray(x), block_values))
        np.testing.assert_array_equal(got, want)
