"""Federated data of M clients, in one of two layouts.

* dense: every leaf of `examples` has shape [M, N, ...] and `num_examples[m]`
  says how many leading rows of client m are real. Memory is M x N, N the
  largest client: the fast path when clients have (nearly) equal sizes.
* flat: every leaf of `examples` has shape [E, ...], the examples of all
  clients one after the other; client m's rows are
  `examples[offsets[m] : offsets[m] + num_examples[m]]`. Memory is the data
  itself, whatever the size distribution (real federated populations are
  long-tailed: a few clients hold thousands of examples, most a few dozen).

Algorithms never see the difference: they work on ONE client's view (inside
`vmap`), read its rows with `client_rows(view, idx)` for indices in [0, N) and
its count `num_examples`, where N (`client_capacity`) is the largest client
for both layouts; rows past a client's count are padding (dense) or other
clients' rows (flat) and are never used unmasked. Under `map_reduce` a flat
store is passed to every client unbatched (see `core.execution`), so nothing
is copied per client. Both layouts give identical results.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct


@struct.dataclass
class ClientData:
    """Examples of M clients, padded to N rows and stacked on a leading axis.

    Attributes:
      examples: dict of arrays, each [M, N, ...] (dense) or [E, ...] (flat).
        By convention "x" holds the features and "y" the integer labels;
        models may use more keys.
      num_examples: [M] int32, number of real rows per client (0 allowed).
      offsets: None (dense) or [M] int32, each client's first row in the
        flat store.
      capacity: flat only (static): N, at least the largest client.
    """

    examples: dict[str, jax.Array]
    num_examples: jax.Array
    offsets: jax.Array | None = None
    capacity: int = struct.field(pytree_node=False, default=0)

    @property
    def is_flat(self) -> bool:
        """Whether the examples are one flat store with per-client offsets."""
        return self.offsets is not None

    @property
    def num_clients(self) -> int:
        """M (static under jit: it comes from a shape)."""
        return self.num_examples.shape[0]

    @property
    def max_examples(self) -> int:
        """N, the rows a client can have (dense: the padded rows; flat: `capacity`)."""
        if self.is_flat:
            return self.capacity
        return next(iter(self.examples.values())).shape[1]

    @property
    def stored_rows(self) -> int:
        """Rows held in memory: M x N (dense) or E (flat)."""
        lead = next(iter(self.examples.values())).shape
        return lead[0] if self.is_flat else lead[0] * lead[1]

    def example_shape(self, key: str) -> tuple[int, ...]:
        """The shape of one example of field `key` (after the client and row axes)."""
        return tuple(self.examples[key].shape[1 if self.is_flat else 2:])

    def row_clients(self) -> np.ndarray:
        """Flat only (host-side): [E] the client of each stored row (-1: no client)."""
        counts = np.asarray(self.num_examples).astype(np.int64)
        starts = np.asarray(self.offsets).astype(np.int64)
        first = np.cumsum(counts) - counts  # each client's first position in the row list
        rows = np.repeat(starts - first, counts) + np.arange(counts.sum())
        owner = np.full(self.stored_rows, -1, np.int64)
        owner[rows] = np.repeat(np.arange(counts.size), counts)
        return owner

    def mask(self) -> jax.Array:
        """[M, N] bool, True on real rows."""
        return jnp.arange(self.max_examples)[None, :] < self.num_examples[:, None]

    @classmethod
    def from_clients(
        cls,
        clients: Sequence[Mapping[str, np.ndarray]],
        *,
        num_classes: int | None = None,
        label_key: str = "y",
        max_examples: int | None = None,
        layout: str = "auto",
    ) -> ClientData:
        """Validates per-client NumPy arrays and stacks them into a `ClientData`.

        Args:
          clients: one dict per client mapping a field name to an array whose
            first axis is that client's examples. Every client has the same
            fields, with the same trailing shapes and dtypes.
          num_classes: if given, labels in `label_key` must lie in
            [0, num_classes); they must be >= 0 in any case.
          label_key: the field holding integer class labels.
          max_examples: pad to this N instead of the largest client (must be
            at least the largest client).
          layout: "dense" ([M, N, ...]), "flat" ([E, ...] with offsets) or
            "auto": flat when padding would more than double the stored rows
            (M x N > 2 E, as with long-tailed client sizes) and the dense
            arrays would exceed `AUTO_FLAT_BYTES` (64 MiB), else dense.

        Raises:
          ValueError: naming the client and the field, for an empty dataset,
            mismatched fields, ragged lengths within a client, mismatched
            trailing shapes or dtypes, non-integer or out-of-range labels, or
            NaN/Inf features.
        """
        if num_classes is not None and not (_is_int(num_classes) and num_classes >= 1):
            raise ValueError(f"num_classes: expected None or an int >= 1, got {num_classes!r}.")
        if max_examples is not None and not _is_int(max_examples):
            raise ValueError(f"max_examples: expected None or an int, got {max_examples!r}.")
        if layout not in LAYOUTS:
            raise ValueError(f"layout: expected one of {LAYOUTS}, got {layout!r}.")
        if isinstance(clients, Mapping) or not isinstance(clients, Sequence):
            raise TypeError(f"clients: expected a sequence of dicts, got {type(clients).__name__}.")
        if len(clients) == 0:
            raise ValueError("clients: expected at least one client, got an empty sequence.")
        fields = sorted(clients[0].keys())
        if not fields:
            raise ValueError("clients[0]: expected at least one field (e.g. 'x', 'y'), got none.")
        ref = {k: np.asarray(clients[0][k]) for k in fields}
        counts = []
        for i, client in enumerate(clients):
            if not isinstance(client, Mapping):
                raise TypeError(f"clients[{i}]: expected a dict of arrays, got "
                                f"{type(client).__name__}.")
            if sorted(client.keys()) != fields:
                raise ValueError(
                    f"clients[{i}]: fields {sorted(client.keys())} differ from "
                    f"clients[0]'s {fields}."
                )
            lengths = set()
            for k in fields:
                a = np.asarray(client[k])
                if a.ndim == 0:
                    raise ValueError(f"clients[{i}][{k!r}]: expected an array with a leading "
                                     "example axis, got a scalar.")
                if a.shape[1:] != ref[k].shape[1:]:
                    raise ValueError(
                        f"clients[{i}][{k!r}]: trailing shape {a.shape[1:]} differs from "
                        f"clients[0]'s {ref[k].shape[1:]}."
                    )
                if a.dtype != ref[k].dtype:
                    raise ValueError(
                        f"clients[{i}][{k!r}]: dtype {a.dtype} differs from clients[0]'s "
                        f"{ref[k].dtype}."
                    )
                if not (np.issubdtype(a.dtype, np.number) or a.dtype == np.bool_):
                    raise ValueError(f"clients[{i}][{k!r}]: expected a numeric dtype, "
                                     f"got {a.dtype}.")
                _check_castable(a, f"clients[{i}][{k!r}]")
                lengths.add(a.shape[0])
            if len(lengths) != 1:
                raise ValueError(
                    f"clients[{i}]: fields have different numbers of examples "
                    f"{ {k: np.asarray(client[k]).shape[0] for k in fields} }."
                )
            counts.append(lengths.pop())
            if label_key in client:
                y = np.asarray(client[label_key])
                if not np.issubdtype(y.dtype, np.integer):
                    raise ValueError(
                        f"clients[{i}][{label_key!r}]: labels must be integers, got {y.dtype}."
                    )
                top = np.inf if num_classes is None else num_classes
                if y.size and (y.min() < 0 or y.max() >= top):
                    expected = "[0, inf)" if num_classes is None else f"[0, {num_classes})"
                    raise ValueError(
                        f"clients[{i}][{label_key!r}]: labels must lie in {expected}, "
                        f"got values in [{y.min()}, {y.max()}]."
                    )
        if sum(counts) == 0:
            raise ValueError("clients: every client has 0 examples; the dataset is empty.")
        n = max(counts)
        if max_examples is not None:
            if max_examples < n:
                raise ValueError(f"max_examples: must be >= the largest client ({n}), "
                                 f"got {max_examples}.")
            n = max_examples
        total = sum(counts)
        row_bytes = sum(int(np.prod(ref[k].shape[1:])) * _device_dtype(ref[k].dtype).itemsize
                        for k in fields)
        dense_bytes = len(clients) * n * row_bytes
        if layout == "flat" or (layout == "auto" and dense_bytes > max(2 * total * row_bytes,
                                                                        AUTO_FLAT_BYTES)):
            starts = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int32)
            specs = {k: (ref[k].shape[1:], _device_dtype(ref[k].dtype)) for k in fields}
            return cls(examples=_flat_store(clients, total, specs),
                       num_examples=jnp.asarray(counts, dtype=jnp.int32),
                       offsets=jnp.asarray(starts), capacity=int(n))
        examples = {}
        for k in fields:
            out = np.zeros((len(clients), n) + ref[k].shape[1:], dtype=_device_dtype(ref[k].dtype))
            for i, client in enumerate(clients):
                out[i, : counts[i]] = client[k]
            examples[k] = jnp.asarray(out)
        return cls(examples=examples, num_examples=jnp.asarray(counts, dtype=jnp.int32))

    def validate(self, name: str = "data") -> ClientData:
        """Checks the invariants of a `ClientData` built by hand; returns it.

        Leaves [M, N, ...] with one N, `num_examples` an [M] integer array in
        [0, N] with at least one example, floats finite after the cast to the
        compute dtype (see `fedjax_pfl.validation.check_client_data`).
        """
        from fedjax_pfl import validation

        validation.check_client_data(self, name)
        return self

    def padding_ratio(self) -> float:
        """Fraction of the stored rows that are padding (host-side; 0 for flat)."""
        return 1.0 - float(np.sum(np.asarray(self.num_examples))) / self.stored_rows

    def take(self, idx: jax.Array) -> ClientData:
        """The clients `idx` ([S] int), as a `ClientData` of S clients (a flat
        store is shared, not copied)."""
        if self.is_flat:
            return self.replace(num_examples=self.num_examples[idx], offsets=self.offsets[idx])
        return jax.tree.map(lambda a: a[idx], self)

    def pad_clients(self, num_clients: int) -> ClientData:
        """Appends empty clients (0 examples) up to `num_clients`."""
        extra = num_clients - self.num_clients
        if extra < 0:
            raise ValueError(f"num_clients: must be >= {self.num_clients}, got {num_clients}.")
        pad = lambda a: jnp.concatenate([a, jnp.zeros((extra, *a.shape[1:]), a.dtype)])
        if self.is_flat:
            return self.replace(num_examples=pad(self.num_examples), offsets=pad(self.offsets))
        return jax.tree.map(pad, self)

    def pad_examples(self, max_examples: int) -> ClientData:
        """Adds padding rows so that N == `max_examples`."""
        extra = max_examples - self.max_examples
        if extra < 0:
            raise ValueError(f"max_examples: must be >= {self.max_examples}, got {max_examples}.")
        if self.is_flat:
            return self.replace(capacity=max_examples)
        pad = lambda a: jnp.concatenate([a, jnp.zeros((a.shape[0], extra, *a.shape[2:]), a.dtype)],
                                        axis=1)
        return self.replace(examples={k: pad(v) for k, v in self.examples.items()})

    def client_arrays(self, i: int) -> dict[str, np.ndarray]:
        """Client i's real rows as NumPy arrays (host-side)."""
        n = int(self.num_examples[i])
        if self.is_flat:
            start = int(self.offsets[i])
            return {k: np.asarray(v[start:start + n]) for k, v in self.examples.items()}
        return {k: np.asarray(v[i, :n]) for k, v in self.examples.items()}

    def to_layout(self, layout: str) -> ClientData:
        """The same clients in the "dense" or "flat" layout (host-side)."""
        if layout not in LAYOUTS[1:]:
            raise ValueError(f"layout: expected 'dense' or 'flat', got {layout!r}.")
        clients = [self.client_arrays(i) for i in range(self.num_clients)]
        return ClientData.from_clients(clients, max_examples=self.max_examples, layout=layout)


LAYOUTS = ("auto", "dense", "flat")
AUTO_FLAT_BYTES = 64 * 2**20  # "auto" keeps smaller datasets dense whatever their padding


def client_examples(view: ClientData) -> dict[str, jax.Array]:
    """All N rows of ONE client's view, leaves [N, ...] (no copy for dense)."""
    if view.is_flat:
        return client_rows(view, jnp.arange(view.capacity))
    return view.examples


def client_capacity(view: ClientData) -> int:
    """N, the rows of ONE client's view (inside `vmap`): indices in [0, N) are valid."""
    if view.is_flat:
        return view.capacity
    return jax.tree.leaves(view.examples)[0].shape[0]


def client_rows(view: ClientData, idx: jax.Array) -> dict[str, jax.Array]:
    """Rows `idx` (int, any shape, values in [0, N)) of ONE client's view.

    Rows at or past the client's count are padding (dense) or belong to
    other clients (flat); callers mask them out.
    """
    if view.is_flat:
        idx = view.offsets + idx
        return jax.tree.map(lambda a: a.at[idx].get(mode="clip"), view.examples)
    return jax.tree.map(lambda a: a[idx], view.examples)


_STAGE_BYTES = 64 * 2**20


def _flat_store(clients, total: int, specs: dict) -> dict[str, jax.Array]:
    """The clients' rows one after the other, as device arrays [E, ...].

    Rows are copied through a host staging buffer of about 64 MB into device
    arrays updated in place (donated), so that building the store needs the
    data once plus the buffer, not a second host copy of everything.
    """
    row_bytes = sum(int(np.prod(shape)) * dtype.itemsize for shape, dtype in specs.values())
    stage_rows = int(min(max(total, 1), max(1, _STAGE_BYTES // max(row_bytes, 1))))
    stores = {k: jnp.zeros((total, *shape), dtype) for k, (shape, dtype) in specs.items()}
    stage = {k: np.zeros((stage_rows, *shape), dtype) for k, (shape, dtype) in specs.items()}
    filled, start = 0, 0

    def flush(rows):
        nonlocal start
        for k in stores:  # the last flush may hold fewer rows: write a full block ending at E
            at = min(start, total - stage_rows)
            block = stage[k] if rows == stage_rows else np.concatenate(
                [np.asarray(stores[k][at:start]), stage[k][:rows]])
            stores[k] = _write_rows(stores[k], block, at)
        start += rows

    for client in clients:
        n, done = len(client[next(iter(specs))]), 0
        while done < n:
            take = min(n - done, stage_rows - filled)
            for k in stores:
                stage[k][filled:filled + take] = client[k][done:done + take]
            filled, done = filled + take, done + take
            if filled == stage_rows:
                flush(filled)
                filled = 0
    if filled:
        flush(filled)
    return stores


@functools.partial(jax.jit, donate_argnums=0)
def _write_rows(store, block, start):
    return jax.lax.dynamic_update_slice_in_dim(store, block, start, axis=0)


def _is_int(value) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def _check_castable(a: np.ndarray, where: str) -> None:
    """Floats finite and integers in range after the cast to the device dtype."""
    target = _device_dtype(a.dtype)
    if np.issubdtype(a.dtype, np.floating):
        with np.errstate(over="ignore", invalid="ignore"):
            bad = int(np.sum(~np.isfinite(a.astype(target))))
        if bad:
            raise ValueError(f"{where}: expected finite values after the cast to {target}, got "
                             f"{bad} NaN/Inf values.")
    elif np.issubdtype(a.dtype, np.integer) and target != a.dtype and a.size:
        info = np.iinfo(target)
        if a.min() < info.min or a.max() > info.max:
            raise ValueError(f"{where}: expected integers that fit {target}, got values in "
                             f"[{a.min()}, {a.max()}].")


def _device_dtype(dtype: np.dtype) -> np.dtype:
    """float64 -> float32 and int64 -> int32 unless x64 is enabled."""
    if jax.config.jax_enable_x64:
        return dtype
    if dtype == np.float64:
        return np.dtype(np.float32)
    if dtype == np.int64:
        return np.dtype(np.int32)
    return dtype
