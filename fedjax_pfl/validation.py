"""Input validation shared by every entry point: bad input is an error, never a wrong number.

Messages follow one style, `name: expected ..., got ...`, and name the
offending argument, field, client or file.

* Arguments: `check_int`, `check_real` (finite, in range), `check_seed`.
* Data: `check_structure` (static: fields, [M, N, ...] shapes, dtypes; safe
  under jit), `check_values` (host: 0 <= n_i <= N, finite after the cast to the
  compute dtype, integer fields that fit it; once per `ClientData` object),
  `check_model_data` (fields and shapes against a model via `jax.eval_shape`,
  labels against its number of classes). `check_data` runs all three; every
  algorithm's `init` calls it (through `core.algorithm.check_data`).
* Driver: `check_inputs(algorithm, state, train, test)` checks the test set (and
  a resumed state's train set) against what `algorithm.evaluate` reads.
* Files: `read_text` (UTF-8, errors naming the file), `load_toml`, `file_error`.
"""

from __future__ import annotations

import functools
import math
import numbers
import os
import weakref
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from fedjax_pfl.data.client_data import ClientData

LABEL_KEY = "y"
SEED_MAX = 2**32 - 1
_SEED_RANGE = "[0, 2**32 - 1]"


# ---------------------------------------------------------------------------- arguments


def _fail(name: str, expected: str, got: Any) -> ValueError:
    return ValueError(f"{name}: expected {expected}, got {got!r}.")


def is_int(value) -> bool:
    """True for Python and NumPy integers, False for bools."""
    return isinstance(value, numbers.Integral) and not isinstance(value, (bool, np.bool_))


def check_int(name: str, value, *, minimum: int | None = None,
              maximum: int | None = None) -> int:
    """Returns `value` as a Python int, or raises naming `name` (bools are not ints).

    Args:
      name: the argument's name, for the message.
      value: the value to check (a Python or NumPy integer).
      minimum, maximum: inclusive bounds (None: unbounded).
    """
    ok = is_int(value) and (minimum is None or value >= minimum) and (
        maximum is None or value <= maximum)
    if not ok:
        raise _fail(name, "an int" + _bounds(minimum, maximum), value)
    return int(value)


def check_real(name: str, value, *, minimum: float | None = None, maximum: float | None = None,
               strict: bool = False) -> float:
    """Returns `value` as a float, or raises unless it is a finite real in range.

    Args:
      name: the argument's name, for the message.
      value: the value to check (int or float, not bool; NaN and Inf are rejected).
      minimum, maximum: bounds (None: unbounded).
      strict: exclude the bounds themselves.
    """
    ok = isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_))
    ok = ok and math.isfinite(value)
    if ok and minimum is not None:
        ok = value > minimum if strict else value >= minimum
    if ok and maximum is not None:
        ok = value < maximum if strict else value <= maximum
    if not ok:
        raise _fail(name, "a finite number" + _bounds(minimum, maximum, strict), value)
    return float(value)


def _bounds(minimum, maximum, strict: bool = False) -> str:
    if minimum is not None and maximum is not None:
        return f" in {'(' if strict else '['}{minimum}, {maximum}{')' if strict else ']'}"
    if minimum is not None:
        return f" {'>' if strict else '>='} {minimum}"
    if maximum is not None:
        return f" {'<' if strict else '<='} {maximum}"
    return ""


def check_seed(name: str, seed) -> int:
    """Returns `seed` as a Python int in [0, 2**32 - 1], or raises naming `name`.

    Any Python or NumPy integer in that range is accepted; bools, negative
    numbers and larger ints are rejected rather than folded: with JAX's default
    32-bit mode `jax.random.key` keeps only the low 32 bits of its seed, so
    folding would silently give 2**32 + 5 the key of 5, and NumPy's generators
    reject negative seeds. Every accepted seed gives a distinct JAX key and a
    distinct NumPy stream.
    """
    if not is_int(seed) or not 0 <= seed <= SEED_MAX:
        shown = f"{seed!r}" if not is_int(seed) or abs(seed) < 10**12 else f"{int(seed):.3e}"
        raise ValueError(f"{name}: expected an int in {_SEED_RANGE}, got {shown}.")
    return int(seed)


# ---------------------------------------------------------------------------- ClientData


def check_structure(data, name: str = "train") -> None:
    """Static checks of a `ClientData` (shapes and dtypes only; safe under jit).

    Raises:
      TypeError: `data` is not a `ClientData`.
      ValueError: naming `name` and the field, for no fields, `num_examples`
        not a 1-D integer array, a leaf not shaped [M, N, ...], or a
        non-numeric dtype.
    """
    if not isinstance(data, ClientData):
        raise TypeError(f"{name}: expected a ClientData, got {type(data).__name__}.")
    if not isinstance(data.examples, Mapping) or not data.examples:
        raise ValueError(f"{name}.examples: expected a non-empty dict of [M, N, ...] arrays, "
                         f"got {data.examples!r:.80}.")
    n = data.num_examples
    if not hasattr(n, "dtype") or np.ndim(n) != 1 or not jnp.issubdtype(n.dtype, jnp.integer):
        got = f"shape {np.shape(n)} dtype {getattr(n, 'dtype', type(n).__name__)}"
        raise ValueError(f"{name}.num_examples: expected a 1-D integer array [M], got {got}.")
    m = n.shape[0]
    if m < 1:
        raise ValueError(f"{name}.num_examples: expected at least one client, got shape (0,).")
    if data.is_flat:
        _check_flat_structure(data, name, m)
        return
    lead = None
    for key, leaf in data.examples.items():
        where = f"{name}.examples[{key!r}]"
        _check_leaf_type(leaf, where)
        if leaf.ndim < 2 or leaf.shape[0] != m:
            raise ValueError(f"{where}: expected shape [M={m}, N, ...], got {leaf.shape}.")
        lead = lead or (key, leaf.shape[1])
        if leaf.shape[1] != lead[1]:
            raise ValueError(f"{where}: expected N={lead[1]} rows per client (as "
                             f"{lead[0]!r}), got shape {leaf.shape}.")


def _check_leaf_type(leaf, where: str) -> None:
    if not hasattr(leaf, "dtype") or not hasattr(leaf, "shape"):
        raise ValueError(f"{where}: expected an array, got {type(leaf).__name__}.")
    if not (jnp.issubdtype(leaf.dtype, jnp.number) or leaf.dtype == jnp.bool_):
        raise ValueError(f"{where}: expected a numeric dtype, got {leaf.dtype}.")


def _check_flat_structure(data: ClientData, name: str, m: int) -> None:
    """The flat layout: leaves [E, ...] with one E, offsets [M] ints, capacity an int >= 1."""
    off = data.offsets
    if not hasattr(off, "dtype") or np.shape(off) != (m,) or not jnp.issubdtype(off.dtype,
                                                                                jnp.integer):
        got = f"shape {np.shape(off)} dtype {getattr(off, 'dtype', type(off).__name__)}"
        raise ValueError(f"{name}.offsets: expected an integer array [M={m}], got {got}.")
    if not is_int(data.capacity) or data.capacity < 1:
        raise ValueError(f"{name}.capacity: expected an int >= 1, got {data.capacity!r}.")
    lead = None
    for key, leaf in data.examples.items():
        where = f"{name}.examples[{key!r}]"
        _check_leaf_type(leaf, where)
        if leaf.ndim < 1:
            raise ValueError(f"{where}: expected shape [E, ...] (flat layout), got {leaf.shape}.")
        lead = lead or (key, leaf.shape[0])
        if leaf.shape[0] != lead[1]:
            raise ValueError(f"{where}: expected E={lead[1]} stored rows (as {lead[0]!r}), got "
                             f"shape {leaf.shape}.")


def _is_concrete(data: ClientData) -> bool:
    leaves = [data.num_examples, data.offsets, *data.examples.values()]
    # Arrays spread over several processes are checked per process before they
    # are assembled (fedjax_pfl.distributed), not here.
    return not any(isinstance(a, jax.core.Tracer) or not getattr(a, "is_fully_addressable", True)
                   for a in leaves if a is not None)


_FACTS: dict[int, tuple[weakref.ref, dict]] = {}


def _facts(data: ClientData, name: str) -> dict:
    """Host-side facts about `data`, computed (and validated) once per object."""
    hit = _FACTS.get(id(data))
    if hit is not None and hit[0]() is data:
        return hit[1]
    with jax.ensure_compile_time_eval():
        facts = _compute_facts(data, name)
    key = id(data)
    _FACTS[key] = (weakref.ref(data, lambda _, k=key: _FACTS.pop(k, None)), facts)
    return facts


def _compute_facts(data: ClientData, name: str) -> dict:
    counts = np.asarray(data.num_examples).astype(np.int64)
    n_max = data.max_examples
    bad = np.flatnonzero((counts < 0) | (counts > n_max))
    if bad.size:
        i = int(bad[0])
        what = ("capacity, the most rows of a client" if data.is_flat
                else "N, the padded rows per client")
        raise ValueError(f"{name}.num_examples: expected ints in [0, {n_max}] ({what}), "
                         f"got {counts[i]} for client {i}.")
    if counts.sum() == 0:
        raise ValueError(f"{name}.num_examples: expected at least one example, got 0 for "
                         f"every one of the {counts.size} clients.")
    owner = None
    if data.is_flat:
        starts, rows = np.asarray(data.offsets).astype(np.int64), data.stored_rows
        bad = np.flatnonzero((starts < 0) | (starts + counts > rows))
        if bad.size:
            i = int(bad[0])
            raise ValueError(f"{name}.offsets: expected client rows inside the {rows} stored "
                             f"rows, got offset {starts[i]} with {counts[i]} examples for "
                             f"client {i}.")
        owner = data.row_clients()
    for key, leaf in data.examples.items():
        _check_leaf_values(leaf, f"{name}.examples[{key!r}]", owner)
    facts = {"counts": counts}
    if LABEL_KEY in data.examples:
        facts["labels"] = _label_range(data, owner)
    return facts


def _check_leaf_values(leaf, where: str, owner=None) -> None:
    """Finite after the cast to the compute dtype; integers that fit it (per client).

    `owner` ([E], flat layout) maps each stored row to its client (-1: none).
    """
    target = jax.dtypes.canonicalize_dtype(leaf.dtype)
    axes = tuple(range(1, leaf.ndim))  # per client (dense) or per stored row (flat)
    if jnp.issubdtype(leaf.dtype, jnp.inexact):
        if isinstance(leaf, np.ndarray):
            with np.errstate(over="ignore", invalid="ignore"):
                bad = np.sum(~np.isfinite(leaf.astype(target)), axis=axes)
        else:  # in blocks: no [E, ...] temporaries next to a store as large as the RAM
            bad = np.asarray(_count_nonfinite(leaf))
        problem, what = f"finite values after the cast to {target}", "NaN/Inf values"
    elif jnp.issubdtype(leaf.dtype, jnp.integer) and target != leaf.dtype:
        info = np.iinfo(target)
        bad = np.sum((np.asarray(leaf) < info.min) | (np.asarray(leaf) > info.max), axis=axes)
        problem, what = f"integers that fit {target} ([{info.min}, {info.max}])", "others"
    else:
        return
    if owner is not None:  # per stored row -> per client (rows of no client are not read)
        keep = owner >= 0
        bad = np.bincount(owner[keep], weights=bad[keep],
                          minlength=int(owner.max()) + 1).astype(np.int64)
    clients = np.flatnonzero(bad)
    if clients.size:
        i = int(clients[0])
        raise ValueError(f"{where}: expected {problem}, got {int(bad[i])} {what} in client "
                         f"{i} ({clients.size} clients affected).")


@functools.partial(jax.jit, static_argnums=1)
def _count_nonfinite(leaf: jax.Array, block_values: int = 2**24) -> jax.Array:
    """NaN/Inf values per client (dense) or per stored row (flat).

    Counted in blocks of about `block_values` values: XLA on CPU does not fuse the
    count into the row reduction, so one pass would hold an int32 copy of the
    whole store (4 bytes per value, as large as the data itself).
    """
    rows, width = leaf.shape[0], max(1, math.prod(leaf.shape[1:]))
    block = max(1, min(rows, block_values // width))
    count = lambda a: jnp.sum(~jnp.isfinite(a), axis=tuple(range(1, a.ndim)), dtype=jnp.int32)

    def body(i, out):  # the last block overlaps its predecessor instead of padding
        start = jnp.minimum(i * block, rows - block)
        part = count(jax.lax.dynamic_slice_in_dim(leaf, start, block))
        return jax.lax.dynamic_update_slice_in_dim(out, part, start, 0)
    return jax.lax.fori_loop(0, -(-rows // block), body, jnp.zeros(rows, jnp.int32))


def _label_range(data: ClientData, owner) -> tuple[np.ndarray, np.ndarray]:
    """Per-client (min, max) label over real rows (0 for empty clients)."""
    y = data.examples[LABEL_KEY]
    if not jnp.issubdtype(y.dtype, jnp.integer):
        return np.zeros(0), np.zeros(0)  # reported by check_model_data
    m = data.num_clients
    if owner is not None:
        y = np.asarray(y).reshape(y.shape[0], -1).astype(np.int64)
        keep = owner >= 0
        lo = np.full(m, np.iinfo(np.int64).max)
        hi = np.full(m, np.iinfo(np.int64).min)
        np.minimum.at(lo, owner[keep], y[keep].min(axis=1))
        np.maximum.at(hi, owner[keep], y[keep].max(axis=1))
        empty = np.asarray(data.num_examples) == 0
        return np.where(empty, 0, lo), np.where(empty, 0, hi)
    mask = data.mask()
    y = np.asarray(y).reshape(y.shape[0], y.shape[1], -1).astype(np.int64)
    real = np.asarray(mask)[:, :, None]
    lo = np.where(real, y, np.iinfo(np.int64).max).min(axis=(1, 2))
    hi = np.where(real, y, np.iinfo(np.int64).min).max(axis=(1, 2))
    empty = ~np.asarray(mask).any(axis=1)
    return np.where(empty, 0, lo), np.where(empty, 0, hi)


def check_values(data: ClientData, name: str = "train") -> None:
    """Host-side checks of a concrete `ClientData` (cached per object; skipped under jit).

    Raises:
      ValueError: naming the field and the first offending client, for
        num_examples outside [0, N] or all 0, NaN/Inf floats (after the cast to
        the compute dtype, e.g. 1e300 in float64 -> inf in float32), or
        integers that do not fit the compute dtype.
    """
    if _is_concrete(data):
        _facts(data, name)


def check_client_data(data, name: str = "train") -> None:
    """`check_structure` and then `check_values`."""
    check_structure(data, name)
    check_values(data, name)


# ---------------------------------------------------------------------------- model


def _example_specs(data: ClientData) -> dict[str, jax.ShapeDtypeStruct]:
    return {k: jax.ShapeDtypeStruct((1, *data.example_shape(k)),
                                    jax.dtypes.canonicalize_dtype(v.dtype))
            for k, v in data.examples.items()}


def _shapes(data: ClientData) -> str:
    return ", ".join(f"{k!r}: {data.example_shape(k)}" for k in data.examples)


def _first_line(e: Exception) -> str:
    text = str(e.args[0] if isinstance(e, KeyError) and e.args else e)
    return " ".join(text.split("(https://")[0].split())


def _trace(fn, data: ClientData, name: str, *args):
    """`jax.eval_shape(fn, *args, one example of data)`, errors re-raised naming the data."""
    try:
        return jax.eval_shape(fn, *args, _example_specs(data))
    except KeyError as e:
        raise ValueError(f"{name}: expected a field {e.args[0]!r} (read by the model or its "
                         f"loss), got fields {sorted(data.examples)}.") from e
    except Exception as e:  # noqa: BLE001 - flax / lax shape errors, reported with the field
        raise ValueError(f"{name}: expected examples that fit the model and its loss, got "
                         f"example shapes "
                         f"{{{_shapes(data)}}}: {type(e).__name__}: {_first_line(e)}") from e


def num_classes(model, data: ClientData, name: str = "train") -> int | None:
    """C from the model's logits [batch, C] (or [batch, T, C]) on one example of `data`.

    The output is found with `jax.eval_shape`.

    Also checks that the loss accepts the output and the example and returns
    one loss per example (nothing is computed). Models whose output is not
    [batch, C] (e.g. a scalar regression in a test) give None; for a classifier
    the labels must be integers.
    """
    params = jax.eval_shape(model.init, jax.random.key(0))
    out = _trace(lambda p, b: model.apply(p, b, None), data, name, params)
    # [batch, C], or [batch, T, C] for per-token (sequence) models
    ndim = getattr(out, "ndim", 0)
    classes = out.shape[-1] if ndim in (2, 3) and out.shape[0] == 1 else None
    if classes is not None:
        _check_label_dtype(data, name)
    loss = _trace(model.loss, data, name, out)
    if getattr(loss, "shape", None) != (1,):
        raise ValueError(f"model: expected a per-example loss [batch], got "
                         f"{getattr(loss, 'shape', type(loss).__name__)} for a batch of 1.")
    return classes


def _check_label_dtype(data: ClientData, name: str) -> bool:
    """Whether `data` has labels; raises unless they are integers (static)."""
    if LABEL_KEY not in data.examples:
        return False
    dtype = data.examples[LABEL_KEY].dtype
    if not jnp.issubdtype(dtype, jnp.integer):
        raise ValueError(f"{name}.examples[{LABEL_KEY!r}]: expected integer class labels, got "
                         f"dtype {dtype}.")
    return True


def check_labels(data: ClientData, classes: int, name: str = "train") -> None:
    """Labels (`examples["y"]`) are integers in [0, classes) on every real row."""
    if not _check_label_dtype(data, name) or not _is_concrete(data):
        return
    where = f"{name}.examples[{LABEL_KEY!r}]"
    lo, hi = _facts(data, name)["labels"]
    bad = np.flatnonzero((lo < 0) | (hi >= classes))
    if bad.size:
        i = int(bad[0])
        raise ValueError(f"{where}: expected labels in [0, {classes}) (the model has {classes} "
                         f"outputs), got labels in [{lo[i]}, {hi[i]}] for client {i}.")


def check_model_data(model, data: ClientData, name: str = "train") -> int:
    """Fields, example shapes and labels of `data` against `model`; returns C (or None)."""
    classes = num_classes(model, data, name)
    if classes is not None:
        check_labels(data, classes, name)
    return classes


def check_data(model, data, name: str = "train") -> int | None:
    """Every check of `data` for `model` (host checks once per object); returns C (or None)."""
    check_client_data(data, name)
    return check_model_data(model, data, name)


def check_inputs(algorithm, state, train, test) -> None:
    """Checks train and test for a run of `algorithm` from `state`, before anything compiles.

    `test` must have the clients, fields and example shapes of `train` and
    everything `algorithm.evaluate` reads (found with `jax.eval_shape`, so
    nothing is computed); the labels of both must lie in [0, C), C read from
    the evaluation's per-class statistics.
    """
    check_client_data(train, "train")
    check_client_data(test, "test")
    if test.num_clients != train.num_clients:
        raise ValueError(f"test: expected {train.num_clients} clients (as train), "
                         f"got {test.num_clients}.")
    _check_like(test, train, "test")
    try:
        out = jax.eval_shape(algorithm.evaluate, state, train, test)
    except KeyError as e:
        raise ValueError(f"test: expected a field {e.args[0]!r} (read by the evaluation), got "
                         f"fields {sorted(test.examples)}.") from e
    except Exception as e:  # noqa: BLE001 - flax / lax shape errors, reported with the field
        raise ValueError(f"test: expected examples that the evaluation accepts, got example "
                         f"shapes {{{_shapes(test)}}}: {type(e).__name__}: {_first_line(e)}") from e
    if "class_tp" in out:
        classes = out["class_tp"].shape[-1]
        check_labels(train, classes, "train")
        check_labels(test, classes, "test")


def _check_like(data: ClientData, ref: ClientData, name: str) -> None:
    """Fields that `data` shares with `ref` have its example shapes and dtype kinds."""
    for key in sorted(set(data.examples) & set(ref.examples)):
        a, b = data.examples[key], ref.examples[key]
        where = f"{name}.examples[{key!r}]"
        if data.example_shape(key) != ref.example_shape(key):
            raise ValueError(f"{where}: expected example shape {ref.example_shape(key)} (as in "
                             f"train), got {data.example_shape(key)}.")
        if jnp.issubdtype(a.dtype, jnp.integer) != jnp.issubdtype(b.dtype, jnp.integer):
            raise ValueError(f"{where}: expected a dtype like train's {b.dtype}, got {a.dtype}.")


# ---------------------------------------------------------------------------- files


def file_error(path, fmt: str, problem: str, name: str = "path") -> ValueError:
    """A one-line `ValueError("{name}: '{path}': invalid {fmt} file: {problem}")`."""
    text = f"{name}: {os.fspath(path)!r}: invalid {fmt} file: {problem}"
    return ValueError(" ".join(text.split()))


def read_text(path, fmt: str, name: str = "path") -> str:
    """The file's text, decoded as UTF-8 (a BOM is dropped).

    Raises:
      FileNotFoundError: no such file.
      ValueError: naming the file and the format, when it is not UTF-8 text
        or cannot be read.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{name}: no such file {path!r}.")
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as e:
        raise file_error(path, fmt, f"cannot read it ({e.strerror or e})", name) from e
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise file_error(path, fmt, f"expected UTF-8 text, got byte 0x{raw[e.start]:02x} at "
                                    f"offset {e.start}", name) from e


def load_toml(path, name: str = "config") -> dict:
    """Parses a UTF-8 TOML file; every failure is one line naming `name` and the file.

    Raises:
      FileNotFoundError: no such file.
      ValueError: the file cannot be read, is not UTF-8 or is not valid TOML.
    """
    import tomllib

    text = read_text(path, "TOML", name)
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise file_error(path, "TOML", str(e), name) from e
