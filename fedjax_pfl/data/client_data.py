"""Federated data stacked on a leading client axis.

A `ClientData` holds the examples of M clients padded to a common N rows:
every leaf of `examples` has shape [M, N, ...] and `num_examples[m]` says how
many leading rows of client m are real. Padding rows are never read by
training (minibatch indices are drawn in [0, n_m)) and are masked out by
evaluation, so their content does not matter (they are zeros).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct


@struct.dataclass
class ClientData:
    """Examples of M clients, padded to N rows and stacked on a leading axis.

    Attributes:
      examples: dict of arrays, each [M, N, ...]. By convention "x" holds the
        features and "y" the integer labels; models may use more keys.
      num_examples: [M] int32, number of real rows per client (0 allowed).
    """

    examples: dict[str, jax.Array]
    num_examples: jax.Array

    @property
    def num_clients(self) -> int:
        """M (static under jit: it comes from a shape)."""
        return self.num_examples.shape[0]

    @property
    def max_examples(self) -> int:
        """N, the padded number of rows per client."""
        return next(iter(self.examples.values())).shape[1]

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
        """Fraction of the stored rows that are padding (host-side)."""
        total = self.num_clients * self.max_examples
        return 1.0 - float(np.sum(np.asarray(self.num_examples))) / total

    def take(self, idx: jax.Array) -> ClientData:
        """The clients `idx` ([S] int), as a `ClientData` of S clients."""
        return jax.tree.map(lambda a: a[idx], self)

    def pad_clients(self, num_clients: int) -> ClientData:
        """Appends empty clients (0 examples) up to `num_clients`."""
        extra = num_clients - self.num_clients
        if extra < 0:
            raise ValueError(f"num_clients: must be >= {self.num_clients}, got {num_clients}.")
        pad = lambda a: jnp.concatenate([a, jnp.zeros((extra, *a.shape[1:]), a.dtype)])
        return jax.tree.map(pad, self)

    def pad_examples(self, max_examples: int) -> ClientData:
        """Adds padding rows so that N == `max_examples`."""
        extra = max_examples - self.max_examples
        if extra < 0:
            raise ValueError(f"max_examples: must be >= {self.max_examples}, got {max_examples}.")
        pad = lambda a: jnp.concatenate([a, jnp.zeros((a.shape[0], extra, *a.shape[2:]), a.dtype)],
                                        axis=1)
        return self.replace(examples={k: pad(v) for k, v in self.examples.items()})

    def client_arrays(self, i: int) -> dict[str, np.ndarray]:
        """Client i's real rows as NumPy arrays (host-side)."""
        n = int(self.num_examples[i])
        return {k: np.asarray(v[i, :n]) for k, v in self.examples.items()}


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
