"""`ClientData` from the Hugging Face and Flower dataset objects users already hold.

Neither library is a dependency: the adapters read the objects through their
public interface (columns of a `datasets.Dataset`; `load_partition` of a Flower
`Partitioner` or `FederatedDataset`), so they work whenever those are installed.

    ds = datasets.load_dataset("flwrlabs/femnist", split="train")   # by the user
    train = fp.data.from_huggingface(ds, client_column="writer_id", x="image", y="character")

    partitioner = flwr_datasets.partitioner.DirichletPartitioner(num_partitions=100, ...)
    partitioner.dataset = ds
    train = fp.data.from_flower(partitioner, x="img", y="label")
"""

from __future__ import annotations

import numpy as np

from fedjax_pfl.data.client_data import ClientData


def _columns(dataset, names: tuple[str, ...], where: str) -> dict[str, np.ndarray]:
    """The named columns of a Hugging Face style dataset as NumPy arrays."""
    available = list(getattr(dataset, "column_names", None) or [])
    missing = [n for n in names if n not in available]
    if missing:
        raise ValueError(f"{where}: expected columns {missing} in the dataset, got columns "
                         f"{available}.")
    if hasattr(dataset, "with_format"):
        dataset = dataset.with_format("numpy")
    out = {}
    for name in names:
        try:
            out[name] = np.asarray(dataset[name])
        except (TypeError, ValueError) as e:
            raise ValueError(f"{where}: column {name!r} does not form one array (ragged or "
                             f"non-numeric values?): {e}") from e
    return out


def _example(cols: dict[str, np.ndarray], x: str, y: str) -> dict[str, np.ndarray]:
    feats = cols[x]
    if feats.dtype == np.uint8:  # images: scale to [0, 1] as the bundled datasets are
        feats = feats.astype(np.float32) / 255.0
    if feats.ndim == 3:  # [n, H, W] grey images -> [n, H, W, 1]
        feats = feats[..., None]
    return {"x": feats, "y": cols[y].astype(np.int32)}


def from_huggingface(dataset, *, client_column: str, x: str = "image", y: str = "label",
                     num_classes: int | None = None, layout: str = "auto") -> ClientData:
    """One client per distinct value of `client_column` (in order of first appearance).

    Args:
      dataset: a `datasets.Dataset` (or anything with `column_names` and
        column access `dataset[name]`).
      client_column: the column naming each example's client (e.g. a writer id).
      x, y: the feature and integer label columns; uint8 images are scaled to
        [0, 1] and grey images get a channel axis.
      num_classes, layout: as `ClientData.from_clients`.
    """
    cols = _columns(dataset, (client_column, x, y), "dataset")
    ids, first, which = np.unique(cols[client_column], return_index=True, return_inverse=True)
    order = np.argsort(first)  # clients in order of first appearance
    rank = np.empty_like(order)
    rank[order] = np.arange(len(order))
    client = rank[which.reshape(-1)]
    examples = _example(cols, x, y)
    rows = np.argsort(client, kind="stable")
    bounds = np.cumsum(np.bincount(client, minlength=len(ids)))[:-1]
    clients = [{k: v[part] for k, v in examples.items()} for part in np.split(rows, bounds)]
    return ClientData.from_clients(clients, num_classes=num_classes, layout=layout)


def from_flower(partitioner, *, x: str = "image", y: str = "label", split: str | None = None,
                num_partitions: int | None = None, num_classes: int | None = None,
                layout: str = "auto") -> ClientData:
    """One client per partition of a Flower Datasets `Partitioner` or `FederatedDataset`.

    Args:
      partitioner: has `load_partition(i)` (a `Partitioner`, with its dataset
        set) or `load_partition(i, split)` (a `FederatedDataset`).
      x, y: the feature and integer label columns (as `from_huggingface`).
      split: the split of a `FederatedDataset` (e.g. "train").
      num_partitions: how many partitions (default: `partitioner.num_partitions`,
        or that of the `FederatedDataset`'s partitioner for `split`).
      num_classes, layout: as `ClientData.from_clients`.
    """
    if not hasattr(partitioner, "load_partition"):
        raise TypeError(f"partitioner: expected a Flower Partitioner or FederatedDataset (with "
                        f"load_partition), got {type(partitioner).__name__}.")
    if num_partitions is None:
        num_partitions = getattr(partitioner, "num_partitions", None)
        inner = getattr(partitioner, "partitioners", None)
        if num_partitions is None and split is not None and isinstance(inner, dict):
            num_partitions = getattr(inner.get(split), "num_partitions", None)
    if not isinstance(num_partitions, int) or num_partitions < 1:
        raise ValueError(f"num_partitions: expected an int >= 1 (not found on the "
                         f"partitioner), got {num_partitions!r}.")
    clients = []
    for i in range(num_partitions):
        part = partitioner.load_partition(i) if split is None else (
            partitioner.load_partition(i, split))
        clients.append(_example(_columns(part, (x, y), f"partition {i}"), x, y))
    return ClientData.from_clients(clients, num_classes=num_classes, layout=layout)
