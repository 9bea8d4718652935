"""Host-side partitioners that split a centralized dataset among clients.

Every partitioner returns one int64 index array per client, pointing into the
dataset. Unless a docstring says otherwise, each index is assigned to exactly
one client. All randomness comes from `np.random.default_rng(seed)`, so the
same arguments give the same partition.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from fedjax_pfl import validation

__all__ = [
    "PARTITIONS",
    "dirichlet",
    "iid",
    "natural",
    "pathological",
    "quantity_skew",
    "train_test_split",
]


def _check_labels(labels) -> np.ndarray:
    labels = np.asarray(labels)
    if labels.ndim != 1:
        raise ValueError(f"labels: expected a 1-D array, got shape {labels.shape}.")
    if labels.size == 0:
        raise ValueError("labels: expected at least one example, got an empty array.")
    return labels


def _check_num_clients(num_clients: int, n: int) -> None:
    if not (validation.is_int(num_clients) and 1 <= num_clients <= n):
        raise ValueError(f"num_clients: expected an int in [1, {n}] (the number of "
                         f"examples), got {num_clients!r}.")


def _rng(seed) -> np.random.Generator:
    return np.random.default_rng(validation.check_int("seed", seed, minimum=0))


def _check_min_samples(min_samples, num_clients: int, n: int) -> None:
    validation.check_int("min_samples", min_samples, minimum=0, maximum=n // num_clients)


def _split_by_sizes(order: np.ndarray, sizes: np.ndarray) -> list[np.ndarray]:
    return [part.astype(np.int64) for part in np.split(order, np.cumsum(sizes)[:-1])]


def _proportional_sizes(total: int, weights: np.ndarray) -> np.ndarray:
    """Integer sizes summing to `total`, proportional to `weights` (largest remainder)."""
    exact = total * weights / weights.sum()
    sizes = np.floor(exact).astype(np.int64)
    short = total - int(sizes.sum())
    if short > 0:
        sizes[np.argsort(sizes - exact, kind="stable")[:short]] += 1
    return sizes


def iid(labels, num_clients: int, *, seed: int = 0) -> list[np.ndarray]:
    """Shuffles the examples and deals them out in near-equal parts.

    Args:
      labels: [N] labels (only the length is used).
      num_clients: number of clients K, in [1, N].
      seed: seed of the shuffle.

    Returns:
      K index arrays whose sizes differ by at most one.
    """
    labels = _check_labels(labels)
    _check_num_clients(num_clients, labels.size)
    order = _rng(seed).permutation(labels.size)
    return [part.astype(np.int64) for part in np.array_split(order, num_clients)]


def dirichlet(labels, num_clients: int, *, alpha: float, seed: int = 0,
              min_samples: int | None = None, max_tries: int = 1000) -> list[np.ndarray]:
    """Label-skewed partition with per-class client proportions drawn from Dir(alpha).

    Follows the rules popularised by PFLlib: classes are visited in sorted
    order; for each class a proportion vector over clients is drawn from
    Dir(alpha); clients that already hold at least N / num_clients examples get
    proportion 0 for that class (a soft size cap); the vector is renormalised
    and the class's shuffled examples are cut at the cumulative proportions.
    The whole assignment is redrawn until every client holds at least
    `min_samples` examples.

    Args:
      labels: [N] integer class labels.
      num_clients: number of clients K, in [1, N].
      alpha: concentration, > 0. Small values (0.1) give few classes per
        client; large values (100) approach an iid split.
      seed: seed of all draws.
      min_samples: the least number of examples per client; defaults to
        min(10, N // K // 2).
      max_tries: how many full redraws to attempt before giving up.

    Returns:
      K index arrays.

    Raises:
      ValueError: for a bad argument, or when no draw in `max_tries` satisfied
        `min_samples`.
    """
    labels = _check_labels(labels)
    n = labels.size
    _check_num_clients(num_clients, n)
    validation.check_real("alpha", alpha, minimum=0, strict=True)
    if min_samples is None:
        min_samples = min(10, n // num_clients // 2)
    _check_min_samples(min_samples, num_clients, n)
    validation.check_int("max_tries", max_tries, minimum=1)
    rng = _rng(seed)
    class_members = [np.flatnonzero(labels == c) for c in np.unique(labels)]
    cap = n / num_clients
    for _ in range(max_tries):
        parts: list[list[np.ndarray]] = [[] for _ in range(num_clients)]
        sizes = np.zeros(num_clients, dtype=np.int64)
        for members in class_members:
            members = rng.permutation(members)
            p = rng.dirichlet(np.full(num_clients, float(alpha))) * (sizes < cap)
            if not p.sum() > 0:
                p = (sizes < cap).astype(np.float64)
            cuts = (np.cumsum(p / p.sum()) * members.size).astype(np.int64)[:-1]
            for k, chunk in enumerate(np.split(members, cuts)):
                parts[k].append(chunk)
                sizes[k] += chunk.size
        if sizes.min() >= min_samples:
            return [np.concatenate(chunks).astype(np.int64) for chunks in parts]
    raise ValueError(
        f"dirichlet: no draw in max_tries={max_tries} gave every one of the {num_clients} "
        f"clients >= min_samples={min_samples} examples; increase alpha, lower min_samples, "
        "use fewer num_clients, or raise max_tries.")


def pathological(labels, num_clients: int, *, classes_per_client: int,
                 seed: int = 0) -> list[np.ndarray]:
    """Shard partition of the FedAvg paper: sort by label, cut into shards, deal shards.

    The examples are shuffled, sorted by label and cut into
    S = num_clients * classes_per_client shards; each client receives
    `classes_per_client` shards picked at random. Shards are cut inside each
    class (a class of n_c examples gets about S * n_c / N shards, at least one),
    so no shard straddles two classes and every client sees at most
    `classes_per_client` classes. That needs S >= the number of distinct
    classes; when S is smaller, shards are cut from the sorted sequence without
    regard to class boundaries (the literal FedAvg scheme) and a client may see
    more classes.

    Args:
      labels: [N] integer class labels.
      num_clients: number of clients K, in [1, N].
      classes_per_client: shards per client, in [1, number of classes], with
        K * classes_per_client <= N so that no shard is empty.
      seed: seed of the within-class shuffle and of the shard dealing.

    Returns:
      K index arrays.
    """
    labels = _check_labels(labels)
    n = labels.size
    _check_num_clients(num_clients, n)
    classes, counts = np.unique(labels, return_counts=True)
    c = classes_per_client
    if not (validation.is_int(c) and 1 <= c <= classes.size and num_clients * c <= n):
        raise ValueError(f"classes_per_client: expected an integer in [1, {classes.size}] (the "
                         f"number of classes) with num_clients * classes_per_client <= {n}, "
                         f"got {classes_per_client}.")
    rng = _rng(seed)
    num_shards = num_clients * c
    shuffled = rng.permutation(n)
    order = shuffled[np.argsort(labels[shuffled], kind="stable")]
    if num_shards >= classes.size:
        shards_per_class = np.ones(classes.size, dtype=np.int64)
        for _ in range(num_shards - classes.size):
            shards_per_class[np.argmax(counts / shards_per_class)] += 1
        shards = []
        for members, k in zip(np.split(order, np.cumsum(counts)[:-1]), shards_per_class):
            shards.extend(np.array_split(members, k))
    else:
        shards = np.array_split(order, num_shards)
    dealt = rng.permutation(num_shards).reshape(num_clients, c)
    return [np.concatenate([shards[s] for s in row]).astype(np.int64) for row in dealt]


def quantity_skew(labels, num_clients: int, *, seed: int = 0, distribution: str = "lognormal",
                  sigma: float = 1.0, exponent: float = 1.5,
                  min_samples: int = 1) -> list[np.ndarray]:
    """Client sizes drawn from a heavy-tailed law; labels iid within each client.

    Raw sizes are drawn from lognormal(0, sigma) or from a Pareto law with
    tail index `exponent` (density ~ s^-(exponent+1) for s >= 1), then
    rescaled so that they sum to N with every client holding at least
    `min_samples` examples. The shuffled examples are dealt in those sizes.

    Args:
      labels: [N] labels (only the length is used).
      num_clients: number of clients K, in [1, N].
      seed: seed of the sizes and of the shuffle.
      distribution: "lognormal" or "power_law".
      sigma: lognormal shape, > 0 (larger is more skewed).
      exponent: Pareto tail index, > 0 (smaller is more skewed).
      min_samples: the least number of examples per client, K * min_samples <= N.

    Returns:
      K index arrays.
    """
    labels = _check_labels(labels)
    n = labels.size
    _check_num_clients(num_clients, n)
    if distribution not in ("lognormal", "power_law"):
        raise ValueError(f"distribution: expected 'lognormal' or 'power_law', got "
                         f"{distribution!r}.")
    validation.check_real("sigma", sigma, minimum=0, strict=True)
    validation.check_real("exponent", exponent, minimum=0, strict=True)
    _check_min_samples(min_samples, num_clients, n)
    rng = _rng(seed)
    if distribution == "lognormal":
        raw = rng.lognormal(0.0, sigma, num_clients)
    else:
        raw = rng.pareto(exponent, num_clients) + 1.0
    sizes = min_samples + _proportional_sizes(n - min_samples * num_clients, raw)
    return _split_by_sizes(rng.permutation(n), sizes)


def natural(ids) -> list[np.ndarray]:
    """One client per distinct id (e.g. writer or user id), in sorted id order.

    Args:
      ids: [N] array of client ids (any sortable dtype).

    Returns:
      One index array per distinct id, each in increasing order.
    """
    ids = _check_labels(ids)
    _, inverse, counts = np.unique(ids, return_inverse=True, return_counts=True)
    return _split_by_sizes(np.argsort(inverse.ravel(), kind="stable"), counts)


def train_test_split(client_indices: Sequence[np.ndarray], *, train_fraction: float = 0.75,
                     seed: int = 0) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Splits every client's examples into a train and a test part.

    A client with n examples gets round(train_fraction * n) training examples,
    clipped to [1, n - 1] when n >= 2 so that both parts are non-empty. A
    client with one example puts it in train; an empty client stays empty.

    Args:
      client_indices: one index array per client.
      train_fraction: fraction of each client's examples used for training, in (0, 1).
      seed: seed of the per-client shuffles.

    Returns:
      (train, test): two lists of sorted int64 index arrays, one per client.
    """
    validation.check_real("train_fraction", train_fraction, minimum=0, maximum=1, strict=True)
    rng = _rng(seed)
    train, test = [], []
    for idx in client_indices:
        idx = rng.permutation(np.asarray(idx, dtype=np.int64))
        n_train = int(round(train_fraction * idx.size))
        if idx.size >= 2:
            n_train = min(max(n_train, 1), idx.size - 1)
        else:
            n_train = idx.size
        train.append(np.sort(idx[:n_train]))
        test.append(np.sort(idx[n_train:]))
    return train, test


PARTITIONS: dict[str, Callable[..., list[np.ndarray]]] = {
    "iid": iid,
    "dirichlet": dirichlet,
    "pathological": pathological,
    "quantity_skew": quantity_skew,
}
