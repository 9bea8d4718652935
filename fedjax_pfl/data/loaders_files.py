"""Readers (and a writer) of local dataset files: PFLlib folders, CIFAR pickles, MNIST IDX.

`fedjax_pfl.data.load` is the entry point; these return pooled arrays
(CIFAR, MNIST) or per-client pairs (PFLlib).
"""

from __future__ import annotations

import gzip
import json
import os
import pickle
import zipfile
import zlib

import numpy as np

from fedjax_pfl import validation
from fedjax_pfl.data.datasets import _features, _labels

_PFLLIB_HINT = "expected PFLlib's dataset folder (github.com/TsingZ0/PFLlib, dataset/generate_*.py)"
_PICKLE_ERRORS = (OSError, EOFError, ValueError, KeyError, TypeError, zipfile.BadZipFile,
                  zlib.error, pickle.UnpicklingError, AttributeError, ImportError, IndexError)


def _pfllib_file(path: str) -> dict[str, np.ndarray]:
    """{"x", "y"} of one PFLlib .npz; it holds `data`, a pickled dict (allow_pickle=True)."""
    try:
        with np.load(path, allow_pickle=True) as f:
            data = f["data"].tolist()
    except _PICKLE_ERRORS as e:
        problem = ("the file is empty" if os.path.getsize(path) == 0
                   else f"{type(e).__name__}: {e}")
        raise validation.file_error(path, "PFLlib .npz", problem) from e
    if not isinstance(data, dict) or not {"x", "y"} <= set(data):
        raise validation.file_error(path, "PFLlib .npz", "expected 'data' to be a dict with "
                                                         "'x' and 'y'")
    x, y = np.asarray(data["x"]), _labels(data["y"], path, "PFLlib .npz", "'y'")
    if x.dtype.kind in "iu":
        x = x.astype(np.int32)  # token ids
    else:
        x = _features(x, path, "PFLlib .npz", "'x'")
    if y.dtype.kind not in "i" or len(x) != len(y):
        raise validation.file_error(path, "PFLlib .npz", f"expected integer 'y' with one label "
                                    f"per row of 'x', got {y.dtype} {y.shape} and x {x.shape}")
    return {"x": x, "y": y}


def read_pfllib(root: str, *, channels_last: bool = True):
    """PFLlib's ROOT/train/{i}.npz and ROOT/test/{i}.npz, i = 0, 1, ... (and config.json).

    Loading them needs `allow_pickle=True` (PFLlib pickles a dict into each
    file): only open folders you trust. With `channels_last`, image features
    [n, C, H, W] with C in (1, 3) become [n, H, W, C]. num_classes comes from
    ROOT/config.json when present, else from the largest label.
    """
    files = {}
    for split in ("train", "test"):
        n = 0
        while os.path.isfile(os.path.join(root, split, f"{n}.npz")):
            n += 1
        if n == 0:
            raise ValueError(f"pfllib: no ROOT/{split}/0.npz in {root!r}; {_PFLLIB_HINT}.")
        files[split] = [os.path.join(root, split, f"{i}.npz") for i in range(n)]
    if len(files["train"]) != len(files["test"]):
        raise ValueError(f"pfllib: {root!r} has {len(files['train'])} train and "
                         f"{len(files['test'])} test client files; expected one of each per "
                         "client.")
    splits = [[(str(i), _pfllib_file(p)) for i, p in enumerate(files[s])]
              for s in ("train", "test")]
    if channels_last:
        for clients in splits:
            for _, d in clients:
                if d["x"].ndim == 4 and d["x"].shape[1] in (1, 3):
                    d["x"] = d["x"].transpose(0, 2, 3, 1)
    labels = [d["y"] for s in splits for _, d in s if len(d["y"])]
    num_classes = max(2, max(int(y.max()) for y in labels) + 1) if labels else 2
    config = os.path.join(root, "config.json")
    if os.path.isfile(config):
        try:
            declared = json.loads(validation.read_text(config, "JSON"))["num_classes"]
        except (ValueError, KeyError, TypeError) as e:
            raise validation.file_error(config, "PFLlib config.json", f"expected an object "
                                        f"with 'num_classes' ({e})") from e
        num_classes = max(num_classes, int(declared))
    return splits[0], splits[1], {"num_classes": num_classes}


def save_pfllib(root, train_clients, test_clients, *, num_classes: int | None = None) -> None:
    """Writes clients in PFLlib's layout, so PFLlib can train on the same split.

    Args:
      root: the dataset folder (ROOT/train/{i}.npz, ROOT/test/{i}.npz and
        ROOT/config.json are written; PFLlib reads it as ../dataset/<name>).
      train_clients, test_clients: one {"x", "y"} dict per client (the same
        number of each), or `ClientData` (padding rows are dropped).
      num_classes: written to config.json (default: largest label + 1).
    """
    splits = [_as_dicts(c) for c in (train_clients, test_clients)]
    if len(splits[0]) != len(splits[1]):
        raise ValueError(f"test_clients: expected {len(splits[0])} clients like "
                         f"train_clients, got {len(splits[1])}.")
    for split, clients in zip(("train", "test"), splits):
        os.makedirs(os.path.join(root, split), exist_ok=True)
        for i, d in enumerate(clients):
            with open(os.path.join(root, split, f"{i}.npz"), "wb") as f:
                np.savez_compressed(f, data={"x": np.asarray(d["x"]), "y": np.asarray(d["y"])})
    if num_classes is None:
        num_classes = max([int(np.max(d["y"])) + 1 for s in splits for d in s if len(d["y"])],
                          default=2)
    with open(os.path.join(root, "config.json"), "w") as f:
        json.dump({"num_clients": len(splits[0]), "num_classes": int(num_classes)}, f)


def _as_dicts(clients) -> list[dict]:
    if hasattr(clients, "num_examples"):  # ClientData
        sizes = np.asarray(clients.num_examples)
        return [{k: np.asarray(v[m, :n]) for k, v in clients.examples.items()}
                for m, n in enumerate(sizes)]
    return list(clients)


def _load_pickle(path: str, fmt: str) -> dict:
    try:
        with open(path, "rb") as f:
            blob = pickle.load(f, encoding="bytes")
    except _PICKLE_ERRORS as e:
        problem = ("the file is empty" if os.path.getsize(path) == 0
                   else f"{type(e).__name__}: {e}")
        raise validation.file_error(path, fmt, problem) from e
    if not isinstance(blob, dict):
        raise validation.file_error(path, fmt, f"expected a dict, got {type(blob).__name__}")
    return {k.decode() if isinstance(k, bytes) else k: v for k, v in blob.items()}


def read_cifar(name: str, root: str, *, label: str = "fine"):
    """The python pickles of CIFAR-10 (data_batch_1..5, test_batch) or CIFAR-100 (train, test).

    ROOT is the extracted folder (cifar-10-batches-py / cifar-100-python) or
    its parent. These are pickles: only open files you trust. Returns pooled
    (x float32 [n, 32, 32, 3] in [0, 1], y int32, num_classes).
    """
    folder, names = (("cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)]
                      + ["test_batch"]) if name == "cifar10"
                     else ("cifar-100-python", ["train", "test"]))
    if label not in ("fine", "coarse"):
        raise ValueError(f"label: expected 'fine' or 'coarse', got {label!r}.")
    key = "labels" if name == "cifar10" else f"{label}_labels"
    if not os.path.isfile(os.path.join(root, names[0])):
        root = os.path.join(root, folder)
    paths = [os.path.join(root, n) for n in names]
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
        raise ValueError(f"{name}: no {missing[0]!r}; expected the python version of "
                         f"{name.upper()} ({', '.join(names)}; cs.toronto.edu/~kriz/cifar.html).")
    xs, ys = [], []
    for path in paths:
        blob = _load_pickle(path, name.upper())
        if "data" not in blob or key not in blob:
            raise validation.file_error(path, name.upper(), f"expected 'data' and {key!r}, got "
                                                            f"{sorted(map(str, blob))}")
        data = np.asarray(blob["data"])
        if data.ndim != 2 or data.shape[1] != 3072 or data.dtype != np.uint8:
            raise validation.file_error(path, name.upper(), f"expected uint8 'data' [n, 3072], "
                                                            f"got {data.dtype} {data.shape}")
        y = _labels(blob[key], path, name.upper(), repr(key))
        if len(y) != len(data):
            raise validation.file_error(path, name.upper(), f"{len(data)} rows but {len(y)} "
                                                            "labels")
        xs.append(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
        ys.append(y)
    num_classes = 10 if name == "cifar10" else (100 if label == "fine" else 20)
    return (np.concatenate(xs) / np.float32(255)).astype(np.float32), np.concatenate(ys), \
        num_classes


_IDX_TYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: str) -> np.ndarray:
    """An IDX file (optionally .gz): magic 0 0 <type> <ndim>, ndim big-endian uint32 sizes."""
    try:
        with (gzip.open if path.endswith(".gz") else open)(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError, zlib.error) as e:
        raise validation.file_error(path, "IDX", f"{type(e).__name__}: {e}") from e
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_TYPES:
        raise validation.file_error(path, "IDX", "the file is empty" if not raw else
                                    f"bad magic number {raw[:4].hex()}")
    ndim = raw[3]
    if len(raw) < 4 + 4 * ndim:
        raise validation.file_error(path, "IDX", "truncated header")
    dims = tuple(int(d) for d in np.frombuffer(raw, ">u4", ndim, 4))
    dtype = np.dtype(_IDX_TYPES[raw[2]])
    want = int(np.prod(dims)) * dtype.itemsize
    if len(raw) - 4 - 4 * ndim != want:
        raise validation.file_error(path, "IDX", f"header says {dims} ({want} bytes of data), "
                                                 f"got {len(raw) - 4 - 4 * ndim} bytes")
    return np.frombuffer(raw, dtype, offset=4 + 4 * ndim).reshape(dims)


def _idx_path(name: str, root: str, stem: str) -> str:
    subdirs = ["", os.path.join("MNIST" if name == "mnist" else "FashionMNIST", "raw")]
    for sub in subdirs:
        for base in (stem, stem.replace("-idx", ".idx")):
            for ext in ("", ".gz"):
                path = os.path.join(root, sub, base + ext)
                if os.path.isfile(path):
                    return path
    raise ValueError(f"{name}: no {stem}[.gz] in {root!r}; expected the four IDX files "
                     "(train-images-idx3-ubyte, train-labels-idx1-ubyte, t10k-*) of "
                     f"{'yann.lecun.com/exdb/mnist' if name == 'mnist' else 'zalandoresearch'}"
                     f"{'' if name == 'mnist' else '/fashion-mnist'}.")


def read_mnist(name: str, root: str):
    """MNIST / Fashion-MNIST IDX files; pooled (x float32 [n, 28, 28, 1] in [0, 1], y, 10)."""
    xs, ys = [], []
    for split in ("train", "t10k"):
        ipath = _idx_path(name, root, f"{split}-images-idx3-ubyte")
        lpath = _idx_path(name, root, f"{split}-labels-idx1-ubyte")
        x, y = read_idx(ipath), read_idx(lpath)
        if x.ndim != 3 or x.dtype != np.uint8:
            raise validation.file_error(ipath, "IDX", f"expected uint8 images [n, H, W], got "
                                                      f"{x.dtype} {x.shape}")
        if y.ndim != 1 or len(y) != len(x) or (len(y) and y.max() > 9):
            raise validation.file_error(lpath, "IDX", f"expected {len(x)} labels in 0..9, got "
                                                      f"{y.shape}")
        xs.append(x[..., None])
        ys.append(y.astype(np.int32))
    return (np.concatenate(xs) / np.float32(255)).astype(np.float32), np.concatenate(ys), 10
