"""Federated data: the stacked `ClientData` container, partitioners and datasets."""

from fedjax_pfl.data.adapters import from_flower, from_huggingface
from fedjax_pfl.data.client_data import LAYOUTS, ClientData
from fedjax_pfl.data.datasets import (
    DATASETS,
    federated_dataset,
    load_csv,
    load_digits,
    load_leaf_json,
    load_mnist_subset,
    load_npz,
    synthetic,
    to_images,
)
from fedjax_pfl.data.loaders import LOADERS, load, save_pfllib
from fedjax_pfl.data.multimodal import multimodal_synthetic
from fedjax_pfl.data.partition import (
    PARTITIONS,
    dirichlet,
    iid,
    natural,
    pathological,
    quantity_skew,
    train_test_split,
)

__all__ = [
    "ClientData",
    "LAYOUTS",
    "DATASETS",
    "PARTITIONS",
    "dirichlet",
    "federated_dataset",
    "from_flower",
    "from_huggingface",
    "iid",
    "load_csv",
    "load_digits",
    "load_leaf_json",
    "load_mnist_subset",
    "load_npz",
    "natural",
    "pathological",
    "quantity_skew",
    "synthetic",
    "to_images",
    "train_test_split",
]
__all__ += ["multimodal_synthetic"]
__all__ += ["LOADERS", "load", "save_pfllib"]
