"""fedjax_pfl.data.load on tiny files of every supported format, written into tmp_path."""

import gzip
import json
import os
import pickle

import numpy as np
import pytest

import fedjax_pfl as fp
from fedjax_pfl.data import loaders_leaf

RNG = np.random.default_rng(0)


def _leaf(root, split, users, make, file="data.json"):
    os.makedirs(root / split, exist_ok=True)
    data = {u: make(n) for u, n in users.items()}
    blob = {"users": list(users), "num_samples": list(users.values()), "user_data": data}
    (root / split / file).write_text(json.dumps(blob))


def _femnist(n):
    return {"x": RNG.random((n, 784)).round(3).tolist(), "y": RNG.integers(0, 62, n).tolist()}


def _write_femnist(root, test_users=None):
    _leaf(root, "train", {"f0": 5, "f1": 3, "f2": 4}, _femnist)
    _leaf(root, "test", test_users or {"f0": 2, "f1": 1, "f2": 2}, _femnist)
    return root


def test_femnist(tmp_path):
    train, test, info = fp.data.load("femnist", root=_write_femnist(tmp_path))
    assert info["input_shape"] == (28, 28, 1) and info["num_classes"] == 62
    assert info["client_ids"] == ["f0", "f1", "f2"] and info["partition"] == "natural"
    assert list(info["train_sizes"]) == [5, 3, 4] and list(info["test_sizes"]) == [2, 1, 2]
    assert train.examples["x"].shape == (3, 5, 28, 28, 1) and test.num_clients == 3
    train, _, info = fp.data.load("femnist", root=tmp_path, num_clients=2,
                                  max_examples_per_client=4)
    assert list(info["train_sizes"]) == [4, 3] and train.num_clients == 2
    # f1 holds 3 + 1 < 5 examples: dropped before the first N are taken.
    train, _, info = fp.data.load("femnist", root=tmp_path, num_clients=2, min_examples=5)
    assert info["client_ids"] == ["f0", "f2"] and list(info["train_sizes"]) == [5, 4]
    with pytest.raises(ValueError, match="min_examples=99"):
        fp.data.load("femnist", root=tmp_path, min_examples=99)


def test_shakespeare_maps_leaf_letters(tmp_path):
    text = "To be, or not to be: that is the question. Whether 'tis nobler in the mind to su"
    assert len(text) == 80 and len(loaders_leaf.ALL_LETTERS) == 80

    def make(n):
        return {"x": [text] * n, "y": ["u"] * (n - 1) + ["@"]}

    _leaf(tmp_path, "train", {"HAMLET": 3}, make)
    _leaf(tmp_path, "test", {"HAMLET": 2}, make)
    train, _, info = fp.data.load("shakespeare", root=tmp_path)
    x = np.asarray(train.examples["x"][0, 0])
    assert x.dtype == np.int32 and x.shape == (80,)
    assert "".join(loaders_leaf.ALL_LETTERS[i] for i in x) == text
    y = np.asarray(train.examples["y"][0, :3])
    assert list(y) == [loaders_leaf.ALL_LETTERS.index("u")] * 2 + [80]  # OOV
    assert info["num_classes"] == 81 and info["vocab_size"] == 81


def test_sent140_vocabulary_from_train(tmp_path):
    def make(texts):
        return lambda n: {"x": [["id", "date", "q", "user", t] for t in texts[:n]],
                          "y": [i % 2 for i in range(n)]}

    _leaf(tmp_path, "train", {"a": 2}, make(["good good day", "bad day !"]))
    _leaf(tmp_path, "test", {"a": 1}, make(["good unseen"]))
    train, test, info = fp.data.load("sent140", root=tmp_path, seq_len=4)
    # vocabulary by train frequency: day 2, good 2, ! 1, bad 1 -> ids from 2
    assert np.asarray(train.examples["x"][0, 0]).tolist() == [3, 3, 2, 0]
    assert np.asarray(test.examples["x"][0, 0]).tolist() == [3, 1, 0, 0]  # 1: unknown
    assert info["vocab_size"] == 6 and info["num_classes"] == 2


def test_leaf_synthetic(tmp_path):
    def make(n):
        return {"x": RNG.normal(size=(n, 60)).tolist(), "y": RNG.integers(0, 10, n).tolist()}

    _leaf(tmp_path, "train", {"u0": 4, "u1": 6}, make, "a.json")
    _leaf(tmp_path, "train", {"u2": 3}, make, "b.json")
    _leaf(tmp_path, "test", {"u0": 1, "u2": 2}, make)
    _, test, info = fp.data.load("leaf_synthetic", root=tmp_path)
    assert info["input_shape"] == (60,) and info["num_clients"] == 3
    assert list(info["test_sizes"]) == [1, 0, 2]  # a train-only user has no test data


def _h5(path, clients):
    h5py = pytest.importorskip("h5py")
    with h5py.File(path, "w") as f:
        for cid, feats in clients.items():
            for k, v in feats.items():
                f.create_dataset(f"examples/{cid}/{k}", data=v)


def test_emnist_and_cifar100_h5(tmp_path):
    def emnist(n):
        return {"pixels": RNG.random((n, 28, 28), np.float32),
                "label": RNG.integers(0, 62, n).astype(np.int32)}

    _h5(tmp_path / "fed_emnist_train.h5", {"c1": emnist(4), "c0": emnist(3)})
    _h5(tmp_path / "fed_emnist_test.h5", {"c0": emnist(1), "c1": emnist(2)})
    train, _, info = fp.data.load("emnist_h5", root=tmp_path)
    assert info["client_ids"] == ["c0", "c1"] and list(info["train_sizes"]) == [3, 4]
    assert train.examples["x"].shape[2:] == (28, 28, 1) and info["num_classes"] == 62

    def cifar(n):
        return {"image": RNG.integers(0, 256, (n, 32, 32, 3)).astype(np.uint8),
                "label": RNG.integers(0, 100, n), "coarse_label": RNG.integers(0, 20, n)}

    _h5(tmp_path / "fed_cifar100_train.h5", {"0": cifar(8), "1": cifar(4)})
    _h5(tmp_path / "fed_cifar100_test.h5", {"9": cifar(2)})
    train, test, info = fp.data.load("cifar100_h5", root=tmp_path, label="coarse")
    assert info["num_classes"] == 20 and info["input_shape"] == (32, 32, 3)
    assert list(info["train_sizes"] + info["test_sizes"]) == [8, 4]
    assert 0 <= float(train.examples["x"].min()) and float(train.examples["x"].max()) <= 1


def test_text_h5(tmp_path):
    snippet = "First Citizen:\nBefore we proceed any further, hear me speak.\n" * 3
    _h5(tmp_path / "shakespeare_train.h5", {"A": {"snippets": [snippet.encode()] * 2}})
    _h5(tmp_path / "shakespeare_test.h5", {"A": {"snippets": [snippet.encode()]}})
    train, _, info = fp.data.load("shakespeare_h5", root=tmp_path)
    assert train.examples["x"].shape == (1, 4, 80) and list(info["train_sizes"]) == [4]
    so = {"tokens": [b"how to sort a list", b"sort a dict"], "tags": [b"python|list", b"python"],
          "title": [b"t", b"u"]}
    _h5(tmp_path / "stackoverflow_train.h5", {"u1": so, "u2": so})
    _h5(tmp_path / "stackoverflow_test.h5", {"u2": so})
    train, test, info = fp.data.load("stackoverflow_h5", root=tmp_path, seq_len=3, num_tags=1)
    assert train.examples["x"].shape == (2, 2, 3) and train.examples["x"].dtype == np.int32
    assert info["num_classes"] == 2 and list(info["test_sizes"]) == [0, 2]


def test_pfllib_round_trip(tmp_path):
    train, test, info = fp.data.federated_dataset("synthetic", num_clients=3, seed=1,
                                                  max_examples_per_client=20)
    fp.data.save_pfllib(tmp_path, train, test, num_classes=10)
    assert sorted(os.listdir(tmp_path / "train")) == ["0.npz", "1.npz", "2.npz"]
    with np.load(tmp_path / "train" / "1.npz", allow_pickle=True) as f:  # as PFLlib reads it
        data = f["data"].tolist()
    assert set(data) == {"x", "y"} and len(data["y"]) == int(info["train_sizes"][1])
    train2, test2, info2 = fp.data.load("pfllib", root=tmp_path)
    assert list(info2["train_sizes"]) == list(info["train_sizes"])
    assert list(info2["test_sizes"]) == list(info["test_sizes"])
    np.testing.assert_array_equal(train2.examples["x"], train.examples["x"])
    np.testing.assert_array_equal(test2.examples["y"], test.examples["y"])
    assert info2["num_classes"] == 10


def test_pfllib_channels_first_images(tmp_path):
    x = RNG.random((4, 3, 8, 8)).astype(np.float32)
    fp.data.save_pfllib(tmp_path, [{"x": x, "y": np.arange(4)}], [{"x": x[:1], "y": [0]}])
    _, _, info = fp.data.load("pfllib", root=tmp_path)
    assert info["input_shape"] == (8, 8, 3) and info["num_classes"] == 4


def _write_cifar10(root):
    folder = root / "cifar-10-batches-py"
    folder.mkdir()
    for i, name in enumerate([f"data_batch_{j}" for j in range(1, 6)] + ["test_batch"]):
        data = np.zeros((6, 3072), np.uint8)
        data[:, :1024] = 255  # red channel first (CHW rows)
        with open(folder / name, "wb") as f:
            pickle.dump({b"data": data, b"labels": [(i + k) % 10 for k in range(6)]}, f)
    return root


def test_cifar10_pickles(tmp_path):
    train, test, info = fp.data.load("cifar10", root=_write_cifar10(tmp_path), num_clients=4,
                                     partition="iid", seed=2)
    assert info["input_shape"] == (32, 32, 3) and info["num_classes"] == 10
    assert int(info["train_sizes"].sum() + info["test_sizes"].sum()) == 36
    x = np.asarray(train.examples["x"][0, 0])
    assert x[..., 0].min() == 1 and x[..., 1:].max() == 0


def test_cifar100_pickles(tmp_path):
    for name, n in (("train", 10), ("test", 4)):
        with open(tmp_path / name, "wb") as f:
            pickle.dump({"data": np.zeros((n, 3072), np.uint8), "fine_labels": [7] * n,
                         "coarse_labels": [3] * n}, f)
    _, _, info = fp.data.load("cifar100", root=tmp_path, num_clients=2, label="coarse",
                              alpha=1.0)
    assert info["num_classes"] == 20 and info["partition"] == "dirichlet"


def _idx(path, arr, gz=False):
    header = bytes([0, 0, 0x08, arr.ndim]) + np.array(arr.shape, ">u4").tobytes()
    (gzip.open if gz else open)(path, "wb").write(header + arr.astype(np.uint8).tobytes())


def _write_mnist(root, gz=False):
    for split, n in (("train", 20), ("t10k", 8)):
        ext = ".gz" if gz else ""
        _idx(root / f"{split}-images-idx3-ubyte{ext}", RNG.integers(0, 256, (n, 28, 28)), gz)
        _idx(root / f"{split}-labels-idx1-ubyte{ext}", np.arange(n) % 10, gz)
    return root


@pytest.mark.parametrize("name,gz", [("mnist", False), ("fashion_mnist", True)])
def test_idx(tmp_path, name, gz):
    train, _, info = fp.data.load(name, root=_write_mnist(tmp_path, gz), num_clients=3,
                                  partition="pathological", classes_per_client=2)
    assert info["input_shape"] == (28, 28, 1) and train.num_clients == 3
    assert int(info["train_sizes"].sum() + info["test_sizes"].sum()) == 28


def _truncate(path):
    path.write_bytes(path.read_bytes()[:30])


@pytest.mark.parametrize("name,setup,match", [
    ("femnist", lambda r: None, r"femnist: no ROOT/train/\*.json in .*preprocess.sh"),
    ("femnist", lambda r: _write_femnist(r, {"f0": 1, "zz": 1}),
     r"test.data\.json.*user 'zz' is in the test split but not in the train split"),
    ("femnist", lambda r: (_write_femnist(r), _truncate(r / "train" / "data.json")),
     r"train.data\.json': invalid LEAF JSON file"),
    ("femnist", lambda r: (_write_femnist(r), (r / "test" / "data.json").write_bytes(b"")),
     r"data\.json': invalid LEAF JSON file"),
    ("femnist", lambda r: (_write_femnist(r), (r / "test" / "data.json").write_bytes(b"\xff{")),
     r"expected UTF-8 text"),
    ("leaf_synthetic", lambda r: _leaf(r, "train", {"u": 2}, lambda n: {"x": [[1]], "y": [0]}),
     r"data\.json.*len\(x\) == len\(y\) == num_samples"),
    ("femnist", lambda r: (_leaf(r, "train", {"u": 1}, lambda n: {"x": [[0.5] * 10], "y": [1]}),
                           _leaf(r, "test", {"u": 1}, _femnist)),
     r"train.data\.json.*user 'u': femnist: expected x of 784 floats"),
    ("pfllib", lambda r: None, r"pfllib: no ROOT/train/0.npz .*PFLlib"),
    ("pfllib", lambda r: (fp.data.save_pfllib(r, [{"x": np.ones((2, 3)), "y": [0, 1]}],
                                              [{"x": np.ones((1, 3)), "y": [0]}]),
                          _truncate(r / "test" / "0.npz")),
     r"test.0\.npz': invalid PFLlib \.npz file"),
    ("pfllib", lambda r: ((r / "train").mkdir(), (r / "test").mkdir(),
                          np.savez(r / "train" / "0.npz", x=np.ones(2)),
                          np.savez(r / "test" / "0.npz", x=np.ones(2))),
     r"0\.npz': invalid PFLlib \.npz file: KeyError"),
    ("cifar10", lambda r: None, r"cifar10: no .*data_batch_1.*python version of CIFAR10"),
    ("cifar10", lambda r: (_write_cifar10(r), _truncate(r / "cifar-10-batches-py" / "test_batch")),
     r"test_batch': invalid CIFAR10 file"),
    ("cifar100", lambda r: [pickle.dump({"data": np.zeros((2, 5), np.uint8), "fine_labels": [0, 1]},
                                        open(r / n, "wb")) for n in ("train", "test")],
     r"train': invalid CIFAR100 file: expected uint8 'data' \[n, 3072\]"),
    ("mnist", lambda r: None, r"mnist: no train-images-idx3-ubyte\[.gz\] .*IDX"),
    ("mnist", lambda r: (_write_mnist(r), _truncate(r / "t10k-images-idx3-ubyte")),
     r"t10k-images-idx3-ubyte': invalid IDX file: header says \(8, 28, 28\)"),
    ("mnist", lambda r: (_write_mnist(r), (r / "train-labels-idx1-ubyte").write_bytes(b"")),
     r"train-labels-idx1-ubyte': invalid IDX file: the file is empty"),
    ("emnist_h5", lambda r: None, r"emnist_h5: no file .*fed_emnist_train\.h5"),
    ("emnist_h5", lambda r: (r / "fed_emnist_train.h5").write_bytes(b"not hdf5"),
     r"fed_emnist_train\.h5': invalid HDF5 file"),
])
def test_bad_input_is_one_line(tmp_path, name, setup, match):
    if name.endswith("_h5"):
        pytest.importorskip("h5py")
    setup(tmp_path)
    with pytest.raises(ValueError, match=match) as e:
        fp.data.load(name, root=tmp_path, num_clients=2)
    assert "\n" not in str(e.value)


def test_bad_arguments():
    with pytest.raises(ValueError, match="unknown dataset 'nope'"):
        fp.data.load("nope", root=".")
    with pytest.raises(ValueError, match="root: femnist reads local files"):
        fp.data.load("femnist", root=None)
    with pytest.raises(ValueError, match="num_clients: cifar10 is pooled data"):
        fp.data.load("cifar10", root=".")
    with pytest.raises(ValueError, match="femnist has no option"):
        fp.data.load("femnist", root=".", alpha=0.5)


def test_cli_femnist(tmp_path, capsys):
    from fedjax_pfl import cli

    root = _write_femnist(tmp_path / "leaf")
    out = tmp_path / "run"
    assert cli.main(["run", "--dataset", "femnist", "--data-dir", str(root), "--rounds", "1",
                     "--eval-every", "1", "--model", "mlp", "--quiet", "--out", str(out)]) == 0
    saved = json.loads((out / "config.json").read_text())
    assert saved["run"]["data_dir"] == str(root) and saved["data"]["partition"] == "natural"
    assert cli.main(["run", "--dataset", "femnist", "--rounds", "1", "--quiet"]) == 1
    assert "--data-dir PATH" in capsys.readouterr().err
