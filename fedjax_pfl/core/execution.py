"""How the client axis runs: `vmap`, `chunked` or `sharded`.

Every strategy evaluates the same per-client function and agrees with the
others to float tolerance:

* `vmap`: all S clients in one vectorized computation (fastest for small S);
* `chunked`: a `lax.scan` over chunks of `chunk_size` clients, vmapped
  inside, with a running sum for reductions: the working set stays in cache
  and temporary memory is O(chunk) instead of O(S);
* `sharded`: the client axis is split over a 1-D device mesh with axis
  `clients` (`shard_map`); each device runs `vmap` (or `chunked` when
  `chunk_size` is set) on its block and reductions become a `psum`. On CPU,
  several host devices come from `jax_num_cpu_devices` (see
  `fedjax_pfl.use_cpu_devices`).

When S does not divide evenly, "sharded" appends zero rows (empty clients)
whose outputs are dropped and excluded from sums; "chunked" instead lets its
last chunk overlap the one before (no padded copies of the inputs and outputs)
and masks the rows already counted.

Reductions are sums by default; `map_reduce(..., reduction=...)` takes any
monoid of `core.reductions` (e.g. `LOG_WEIGHTED_SUM`, a softmax-weighted sum
with online max-rescaling), folded per chunk, across chunks and across
devices alike.

A flat `ClientData` (long-tailed client sizes) among the per-client inputs
keeps its example store out of the client axis: the store is passed to every
client unbatched (replicated under `sharded`), and each client's view is its
offset and count. Clients then run ordered by size class (capacities 16, 64,
256, ..., the largest client) in groups of at most `chunk_size` (`FLAT_CHUNK`
under "vmap") that shrink as the class grows, each group seeing its class's
capacity: epoch-mode training and evaluation cost what each client's data
costs, not what the largest client's would.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from fedjax_pfl.core.reductions import SUM, Reduction
from fedjax_pfl.data.client_data import ClientData

STRATEGIES = ("vmap", "chunked", "sharded")
AXIS = "clients"


@dataclasses.dataclass(frozen=True)
class Execution:
    """A client-axis execution strategy (static configuration).

    Attributes:
      strategy: "vmap", "chunked" or "sharded".
      chunk_size: clients per chunk ("chunked", required) or per chunk inside
        each device's block ("sharded", optional).
      mesh: the 1-D mesh with axis "clients" for "sharded" (default: every
        device).
    """

    strategy: str = "vmap"
    chunk_size: int | None = None
    mesh: Mesh | None = None

    def __post_init__(self):
        if self.strategy not in STRATEGIES:
            raise ValueError(f"execution: strategy must be one of {STRATEGIES}, "
                             f"got {self.strategy!r}.")
        if self.chunk_size is not None and not (isinstance(self.chunk_size, int)
                                                and self.chunk_size >= 1):
            raise ValueError(f"execution: chunk_size must be an int >= 1, got {self.chunk_size!r}.")
        if self.strategy == "chunked" and self.chunk_size is None:
            raise ValueError("execution: strategy 'chunked' needs chunk_size (e.g. 64).")
        if self.mesh is not None and tuple(self.mesh.axis_names) != (AXIS,):
            raise ValueError(f"execution: mesh must have the single axis {AXIS!r}, "
                             f"got {self.mesh.axis_names}.")


def as_execution(spec: str | Execution) -> Execution:
    """`Execution` from a strategy name ("chunked" gets chunk_size 64) or itself."""
    if isinstance(spec, Execution):
        return spec
    if spec == "chunked":
        return Execution("chunked", chunk_size=64)
    return Execution(spec)


def client_mesh(devices=None) -> Mesh:
    """A 1-D mesh with axis "clients" over `devices` (default: all)."""
    devices = jax.devices() if devices is None else devices
    return Mesh(np.asarray(devices), (AXIS,))


def shard_clients(tree, mesh: Mesh | None = None):
    """Places every leaf's leading (client) axis on the "clients" mesh axis.

    The leading size must be divisible by the number of devices (pad with
    `ClientData.pad_clients` otherwise).
    """
    mesh = client_mesh() if mesh is None else mesh
    return jax.device_put(tree, NamedSharding(mesh, P(AXIS)))


def _pad_rows(tree, multiple: int):
    size = jax.tree.leaves(tree)[0].shape[0]
    extra = -size % multiple
    pad = lambda a: jnp.concatenate([a, jnp.zeros((extra, *a.shape[1:]), a.dtype)])
    padded = jax.tree.map(pad, tree) if extra else tree
    return padded, jnp.arange(size + extra) < size


def _vmap_reduce(fn, broadcast, xs, valid, reduction: Reduction = SUM):
    ys, zs = jax.vmap(fn, in_axes=(None, 0))(broadcast, xs)
    if not jax.tree.leaves(zs):
        return ys, zs
    neutral = jax.vmap(reduction.identity)(zs)
    mask = lambda z, e: jnp.where(valid.reshape((-1,) + (1,) * (z.ndim - 1)), z, e)
    return ys, reduction.fold_axis(jax.tree.map(mask, zs, neutral))


def _chunked_reduce(fn, broadcast, xs, valid, chunk: int, reduction: Reduction = SUM,
                    varying: bool = False):
    size = valid.shape[0]
    split = lambda a: a.reshape((size // chunk, chunk) + a.shape[1:])
    xs_c, valid_c = jax.tree.map(split, xs), split(valid)
    z_shape = jax.eval_shape(lambda b, x: fn(b, x)[1], broadcast,
                             jax.tree.map(lambda a: a[0], xs))
    zeros = reduction.identity(jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), z_shape))
    if varying:  # inside shard_map the running total differs per device
        zeros = jax.tree.map(lambda a: jax.lax.pcast(a, AXIS, to="varying"), zeros)

    def body(total, chunk_xs):
        ys, zs = _vmap_reduce(fn, broadcast, *chunk_xs, reduction)
        if not jax.tree.leaves(zs):
            return total, ys
        return reduction.combine(total, zs), ys

    total, ys = jax.lax.scan(body, zeros, (xs_c, valid_c))
    return jax.tree.map(lambda a: a.reshape((size,) + a.shape[2:]), ys), total


def _is_data(x) -> bool:
    return isinstance(x, ClientData)


def _split_stores(xs):
    """(xs with every flat store removed, the stores in leaf order; None for others)."""
    nodes = jax.tree.leaves(xs, is_leaf=_is_data)
    stores = tuple(n.examples if _is_data(n) and n.is_flat else None for n in nodes)
    strip = lambda n: n.replace(examples={}) if _is_data(n) and n.is_flat else n
    return jax.tree.map(strip, xs, is_leaf=_is_data), stores


def _with_stores(x, stores, capacity: int):
    """One client's view: the stores put back, capacities cut to `capacity`."""
    it = iter(stores)

    def put(n):
        store = next(it)
        if store is None:
            return n
        return n.replace(examples=store, capacity=min(capacity, n.capacity))

    return jax.tree.map(put, x, is_leaf=_is_data)


# Size classes of flat data: capacities 16, 64, 256, ... up to the largest client. Each
# class compiles its own branch, so a ratio of 4 trades some padding (a client
# runs at most 4x its rows in epoch mode and evaluation) for half the compile time of 2.
_FIRST_CLASS = 16
_CLASS_RATIO = 4
_ROWS_PER_CALL = 2**14  # rows a vectorized call may hold (client capacity x clients)
FLAT_CHUNK = 64  # clients per chunk for flat data under "vmap"


def _ladder(capacity: int) -> tuple[int, ...]:
    caps, c = [], _FIRST_CLASS
    while c < capacity:
        caps.append(c)
        c *= _CLASS_RATIO
    return (*caps, capacity)


def _size_classes(xs, ladder) -> jax.Array:
    """[S] int32: per client, the smallest class whose capacity holds all its flat rows."""
    nodes = [n for n in jax.tree.leaves(xs, is_leaf=_is_data) if _is_data(n) and n.is_flat]
    steps = jnp.asarray(ladder, jnp.int32)
    found = [jnp.searchsorted(steps, n.num_examples, side="left") for n in nodes]
    return functools.reduce(jnp.maximum, found).astype(jnp.int32)


def _classed_reduce(fn, ladder, reduction, broadcast, xs, valid, classes, chunk: int,
                    varying: bool):
    """Runs clients sorted by size class in groups whose size follows their class.

    A loop walks the sorted clients: from position p it takes the smallest
    class b whose group, the next `_ROWS_PER_CALL // ladder[b]` clients (at
    most `chunk`, at least one), all fit capacity `ladder[b]`, and runs that
    group vectorized with views of that capacity. Many small clients share
    one call; the largest run a few at a time, so work and memory follow each
    client's own size class rather than the largest client's.
    """
    size = valid.shape[0]
    subs = [max(1, min(chunk, _ROWS_PER_CALL // cap)) for cap in ladder]
    pad = lambda a, fill=0: jnp.concatenate([a, jnp.full((chunk,) + a.shape[1:], fill, a.dtype)])
    xs, valid, classes = jax.tree.map(pad, xs), pad(valid, False), pad(classes)
    group = lambda tree, p, n: jax.tree.map(lambda a: jax.lax.dynamic_slice_in_dim(a, p, n), tree)

    def branch(b):
        f = lambda bc, x: fn(bc[0], _with_stores(x, bc[1], ladder[b]))

        def run(p, ys, total):
            out, zs = _vmap_reduce(f, broadcast, group(xs, p, subs[b]), group(valid, p, subs[b]),
                                   reduction)
            ys = jax.tree.map(lambda a, y: jax.lax.dynamic_update_slice_in_dim(a, y, p, 0), ys,
                              out)
            return p + subs[b], ys, reduction.combine(total, zs) if jax.tree.leaves(zs) else total
        return run

    branches = [branch(b) for b in range(len(ladder))]
    one = jax.tree.map(lambda a: a[:1], (xs, valid))
    y_shape, z_shape = jax.eval_shape(lambda x, v: _vmap_reduce(
        lambda bc, c: fn(bc[0], _with_stores(c, bc[1], ladder[0])), broadcast, x, v, reduction),
        *one)
    start = (jnp.zeros((), jnp.int32),
             jax.tree.map(lambda t: jnp.zeros((size + chunk,) + t.shape[1:], t.dtype), y_shape),
             reduction.identity(jax.tree.map(lambda t: jnp.zeros(t.shape, t.dtype), z_shape)))
    if varying:
        start = jax.tree.map(lambda a: jax.lax.pcast(a, AXIS, to="varying"), start)

    def body(carry):
        p = carry[0]
        fits = [jnp.max(jnp.where(group(valid, p, n), group(classes, p, n), 0)) <= b
                for b, n in enumerate(subs)]
        return jax.lax.switch(jnp.argmax(jnp.stack(fits)), branches, *carry)

    _, ys, total = jax.lax.while_loop(lambda c: c[0] < size, body, start)
    return jax.tree.map(lambda a: a[:size], ys), total


def _flat_map_reduce(fn, broadcast, xs, stores, execution: Execution, reduction: Reduction):
    """`map_reduce` with flat data: clients sorted by size class, run in classed groups.

    The cohort is ordered by size class (stably; dealt round-robin over
    devices under "sharded", so each device gets a like mix of sizes), run by
    `_classed_reduce` (groups of at most `chunk` clients), and its outputs are
    put back in the cohort's order.
    """
    size = jax.tree.leaves(xs)[0].shape[0]
    capacity = max(n.capacity for n in jax.tree.leaves(xs, is_leaf=_is_data)
                   if _is_data(n) and n.is_flat)
    ladder = _ladder(capacity)
    devices = 1
    if execution.strategy == "sharded":
        mesh = execution.mesh or client_mesh()
        devices = mesh.devices.size
    xs_p, valid = _pad_rows(xs, devices)
    chunk = min(execution.chunk_size or FLAT_CHUNK, valid.shape[0] // devices)
    order = jnp.argsort(_size_classes(xs_p, ladder), stable=True)
    order = order.reshape(-1, devices).T.reshape(-1)  # deal round-robin over devices
    xs_s, valid_s = jax.tree.map(lambda a: a[order], (xs_p, valid))
    classes = _size_classes(xs_s, ladder)
    fn_b = functools.partial(_classed_reduce, fn, ladder, reduction)
    if devices == 1:
        ys, total = fn_b((broadcast, stores), xs_s, valid_s, classes, chunk, False)
    else:
        def per_device(b, x, v, c):
            b = jax.tree.map(lambda a: jax.lax.pcast(a, AXIS, to="varying"), b)
            ys, zs = fn_b(b, x, v, c, chunk, True)
            return ys, reduction.across(zs, AXIS) if jax.tree.leaves(zs) else zs

        ys, total = jax.shard_map(per_device, mesh=mesh, in_specs=(P(), P(AXIS), P(AXIS), P(AXIS)),
                                  out_specs=(P(AXIS), P()))((broadcast, stores), xs_s, valid_s,
                                                            classes)
    back = jnp.argsort(order)
    return jax.tree.map(lambda a: a[back][:size], ys), total


def _overlapped_reduce(fn, broadcast, xs, chunk: int, reduction: Reduction = SUM):
    """"chunked" when `chunk` does not divide S, without padded copies of xs and ys.

    Chunk i covers rows [min(i chunk, S - chunk), + chunk): the last chunk
    overlaps the one before, its rows already counted are masked out of the
    reduction, and every row's y is written in place into one [S, ...] buffer
    (the overlapping rows twice, with the same values). Padding instead would
    copy every leaf of xs and of ys once more per call.
    """
    size = jax.tree.leaves(xs)[0].shape[0]
    row = jax.tree.map(lambda a: a[0], xs)
    y_shape, z_shape = jax.eval_shape(fn, broadcast, row)
    ys = jax.tree.map(lambda s: jnp.zeros((size,) + s.shape, s.dtype), y_shape)
    total = reduction.identity(jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), z_shape))

    def body(carry, i):
        total, ys = carry
        start = jnp.minimum(i * chunk, size - chunk)
        x = jax.tree.map(lambda a: jax.lax.dynamic_slice_in_dim(a, start, chunk), xs)
        y, z = _vmap_reduce(fn, broadcast, x, start + jnp.arange(chunk) >= i * chunk, reduction)
        ys = jax.tree.map(lambda buf, v: jax.lax.dynamic_update_slice_in_dim(buf, v, start, 0),
                          ys, y)
        return (reduction.combine(total, z) if jax.tree.leaves(z) else total, ys), None

    (total, ys), _ = jax.lax.scan(body, (total, ys), jnp.arange(-(-size // chunk)))
    return ys, total


def map_reduce(fn: Callable, broadcast, xs, execution: Execution,
               reduction: Reduction = SUM):
    """Maps `fn` over the leading client axis of `xs` and reduces part of its output.

    Args:
      fn: `fn(broadcast, x) -> (y, z)` for ONE client; `y` is kept per client,
        `z` is reduced over clients.
      broadcast: a pytree shared by all clients (e.g. server params).
      xs: a pytree with leaves [S, ...].
      execution: the strategy.
      reduction: how the `z` combine (a `core.reductions.Reduction`; default
        `SUM`). Padding rows count as its identity; "chunked" folds each chunk
        and combines the running total, "sharded" also reduces across devices
        with `reduction.across`.

    Returns:
      (ys with leaves [S, ...], the reduction over clients of z).
    """
    xs, stores = _split_stores(xs)
    if any(store is not None for store in stores):
        return _flat_map_reduce(fn, broadcast, xs, stores, execution, reduction)
    size = jax.tree.leaves(xs)[0].shape[0]
    chunk = execution.chunk_size
    if execution.strategy == "vmap":
        return _vmap_reduce(fn, broadcast, xs, jnp.ones((size,), bool), reduction)
    if execution.strategy == "chunked":
        if size > chunk and size % chunk:
            return _overlapped_reduce(fn, broadcast, xs, chunk, reduction)
        xs_p, valid = _pad_rows(xs, min(chunk, size))
        ys, total = _chunked_reduce(fn, broadcast, xs_p, valid, min(chunk, size), reduction)
        return jax.tree.map(lambda a: a[:size], ys), total

    mesh = execution.mesh or client_mesh()
    devices = mesh.devices.size
    block = -(-size // devices)
    chunk = min(chunk or block, block)
    xs_p, valid = _pad_rows(xs, devices * chunk)

    def per_device(b, x, v):
        # Replicated inputs must be marked device-varying, or differentiating
        # through them inside shard_map would psum per-client gradients.
        b = jax.tree.map(lambda a: jax.lax.pcast(a, AXIS, to="varying"), b)
        if chunk == v.shape[0]:
            ys, zs = _vmap_reduce(fn, b, x, v, reduction)
        else:
            ys, zs = _chunked_reduce(fn, b, x, v, chunk, reduction, varying=True)
        if not jax.tree.leaves(zs):
            return ys, zs
        return ys, reduction.across(zs, AXIS)

    ys, total = jax.shard_map(per_device, mesh=mesh, in_specs=(P(), P(AXIS), P(AXIS)),
                              out_specs=(P(AXIS), P()))(broadcast, xs_p, valid)
    return jax.tree.map(lambda a: a[:size], ys), total


def map_clients(fn: Callable, broadcast, xs, execution: Execution):
    """`fn(broadcast, x) -> y` mapped over the client axis: leaves [S, ...]."""
    return map_reduce(lambda b, x: (fn(b, x), ()), broadcast, xs, execution)[0]
