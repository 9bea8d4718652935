"""`load`: real federated datasets from files the user already has (nothing is downloaded).

| name | files under `root` | clients |
| --- | --- | --- |
| femnist, shakespeare, sent140, leaf_synthetic | LEAF: train/*.json, test/*.json | natural |
| *_h5: emnist, cifar100, shakespeare, stackoverflow | TFF: <p>_train.h5, <p>_test.h5 | natural |
| pfllib | PFLlib: train/{i}.npz, test/{i}.npz (see `save_pfllib`) | natural |
| cifar10, cifar100 | the python pickles (data_batch_*, test_batch / train, test) | partitioned |
| mnist, fashion_mnist | IDX files train-images-idx3-ubyte(.gz), ... | partitioned |

The HDF5 ones need h5py (`pip install 'fedjax_pfl[datasets]'`).
"""

from __future__ import annotations

import inspect
import os
from typing import Any

import numpy as np

from fedjax_pfl import validation
from fedjax_pfl.data import loaders_files, loaders_leaf
from fedjax_pfl.data.client_data import LAYOUTS, ClientData
from fedjax_pfl.data.datasets import _call
from fedjax_pfl.data.partition import PARTITIONS, train_test_split

NATURAL = {
    **{n: loaders_leaf.read_leaf for n in ("femnist", "shakespeare", "sent140", "leaf_synthetic")},
    **{n: loaders_leaf.read_h5 for n in loaders_leaf.H5_FILES},
    "pfllib": lambda name, root, **kw: loaders_files.read_pfllib(root, **kw),
}
CENTRAL = {"cifar10": loaders_files.read_cifar, "cifar100": loaders_files.read_cifar,
           "mnist": loaders_files.read_mnist, "fashion_mnist": loaders_files.read_mnist}
LOADERS = sorted(NATURAL) + sorted(CENTRAL)
_READER_OPTIONS = {"pfllib": {"channels_last"}, "cifar10": set(), "cifar100": {"label"},
                   "mnist": set(), "fashion_mnist": set()}


def _options(name: str) -> set[str]:
    if name in _READER_OPTIONS:
        return _READER_OPTIONS[name]
    fn = NATURAL[name]
    return {k for k, p in inspect.signature(fn).parameters.items() if p.kind is p.KEYWORD_ONLY}


def load(name: str, root, *, num_clients: int | None = None, partition: str = "dirichlet",
         seed: int = 0, train_fraction: float = 0.75, max_examples_per_client: int | None = None,
         min_examples: int = 0, layout: str = "auto",
         **options) -> tuple[ClientData, ClientData, dict[str, Any]]:
    """Train and test `ClientData` of a dataset read from local files, like `federated_dataset`.

    Naturally federated formats (LEAF, TFF HDF5, PFLlib) keep their clients
    and their own train/test split; `num_clients` takes the first N (in file
    order; TFF's sorted ids). CIFAR and MNIST pool their official train and
    test sets, split them among `num_clients` clients with
    `PARTITIONS[partition]` (options such as alpha=0.5 go to it) and split
    each client by `train_fraction`, as `federated_dataset` does.

    Args:
      name: one of `LOADERS`.
      root: the folder holding the files (see the module docstring).
      num_clients: number of clients (required for CIFAR and MNIST).
      partition: a key of `PARTITIONS` (CIFAR and MNIST only).
      seed: seed of the partition, the splits and the subsampling.
      train_fraction: per-client training fraction where a split is made.
      max_examples_per_client: cap each client's train and test examples at
        this, by a seeded random subsample.
      min_examples: drop the clients holding fewer examples (train + test,
        before the cap), as LEAF's `--min_samples` does; applied before
        `num_clients` takes the first N of naturally federated data.
      layout: `ClientData` layout, "auto" (flat when padding to the largest
        client would more than double memory), "dense" or "flat".
      **options: options of the format (e.g. label="coarse" for CIFAR-100,
        vocab_size/seq_len for text, test="split" for HDF5), else of the
        partitioner.

    Returns:
      (train, test, info); info as in `federated_dataset` ("name",
      "num_classes", "input_shape", "num_clients", "partition", "train_sizes",
      "test_sizes"), plus "vocab_size" for token inputs and "client_ids" for
      naturally federated data.

    Raises:
      ValueError: one line, for an unknown name or option, a missing file
        (naming the expected files and their origin) or a bad file (naming it).
    """
    if name not in NATURAL and name not in CENTRAL:
        raise ValueError(f"name: unknown dataset {name!r}; expected one of {LOADERS}.")
    if root is None:
        raise ValueError(f"root: {name} reads local files; expected the folder holding them.")
    root = os.fspath(root)
    if not os.path.isdir(root):
        raise ValueError(f"root: {name}: no such directory {root!r}.")
    if num_clients is not None:
        validation.check_int("num_clients", num_clients, minimum=1)
    seed = validation.check_seed("seed", seed)
    validation.check_real("train_fraction", train_fraction, minimum=0, maximum=1, strict=True)
    if max_examples_per_client is not None:
        validation.check_int("max_examples_per_client", max_examples_per_client, minimum=1)
    validation.check_int("min_examples", min_examples, minimum=0)
    if layout not in LAYOUTS:
        raise ValueError(f"layout: expected one of {LAYOUTS}, got {layout!r}.")
    reader_kw = {k: v for k, v in options.items() if k in _options(name)}
    other = {k: v for k, v in options.items() if k not in reader_kw}
    if name in NATURAL:
        if other:
            raise ValueError(f"options: {name} has no option {sorted(other)}; its options are "
                             f"{sorted(_options(name))}.")
        train, test, meta = NATURAL[name](name, root, **reader_kw)
        if min_examples:
            sizes = {c: len(d["y"]) for c, d in test or ()}
            train = [(c, d) for c, d in train if len(d["y"]) + sizes.get(c, 0) >= min_examples]
        train = train[:num_clients]
        if test is None:
            parts = [np.arange(len(d["y"])) for _, d in train]
            tr, te = train_test_split(parts, train_fraction=train_fraction, seed=seed + 1)
            test = [(c, {k: v[i] for k, v in d.items()}) for (c, d), i in zip(train, te)]
            train = [(c, {k: v[i] for k, v in d.items()}) for (c, d), i in zip(train, tr)]
            partition = "natural (train clients split)"
        else:
            by_id = dict(test)
            empty = {k: v[:0] for k, v in train[0][1].items()} if train else {}
            test = [(c, by_id.get(c, empty)) for c, _ in train]
            partition = "natural"
        ids = [c for c, _ in train]
        train, test = [d for _, d in train], [d for _, d in test]
    else:
        if num_clients is None:
            raise ValueError(f"num_clients: {name} is pooled data; expected the number of "
                             "clients to partition it among.")
        if partition not in PARTITIONS:
            raise ValueError(f"partition: unknown partition {partition!r}; expected one of "
                             f"{sorted(PARTITIONS)}.")
        x, y, num_classes = CENTRAL[name](name, root, **reader_kw)
        meta, ids = {"num_classes": num_classes}, None
        parts = _call(PARTITIONS[partition], y, num_clients, seed=seed, **other)
        parts = [p for p in parts if len(p) >= min_examples]
        tr, te = train_test_split(parts, train_fraction=train_fraction, seed=seed + 1)
        train = [{"x": x[i], "y": y[i]} for i in tr]
        test = [{"x": x[i], "y": y[i]} for i in te]
    if not train:
        raise ValueError(f"root: {name}: {root!r} holds no clients"
                         + (f" with at least min_examples={min_examples} examples." if min_examples
                            else "."))
    if max_examples_per_client is not None:
        rng = np.random.default_rng(seed)
        train, test = ([_cap(d, max_examples_per_client, rng) for d in s] for s in (train, test))
    info = {"name": name, "num_classes": meta["num_classes"],
            "input_shape": tuple(train[0]["x"].shape[1:]), "num_clients": len(train),
            "partition": partition, "train_sizes": np.array([len(d["y"]) for d in train]),
            "test_sizes": np.array([len(d["y"]) for d in test])}
    if "vocab_size" in meta:
        info["vocab_size"] = meta["vocab_size"]
    if ids is not None:
        info["client_ids"] = ids
    num_classes = meta["num_classes"]
    return (ClientData.from_clients(train, num_classes=num_classes, layout=layout),
            ClientData.from_clients(test, num_classes=num_classes, layout=layout), info)


def _cap(d: dict, cap: int, rng: np.random.Generator) -> dict:
    n = len(d["y"])
    if n <= cap:
        return d
    keep = np.sort(rng.choice(n, cap, replace=False))
    return {k: v[keep] for k, v in d.items()}


save_pfllib = loaders_files.save_pfllib
