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
runs through `core.flat_execution` (clients grouped by size class).
"""

from __future__ import annotations

import dataclasses
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


def _overlapped_reduce(fn, broadcast, xs, chunk: int, reduction: Reduction = SUM,
                       valid=None, varying: bool = False):
    """"chunked" when `chunk` does not divide S, without padded copies of xs and ys.

    Chunk i covers rows [min(i chunk, S - chunk), + chunk): the last chunk
    overlaps the one before, its rows already counted are masked out of the
    reduction (as are rows where `valid` is False), and every row's y is
    written in place into one [S, ...] buffer (the overlapping rows twice,
    with the same values). Padding instead would copy every leaf of xs and of
    ys once more per call. `varying`: inside shard_map (per-device totals).
    """
    size = jax.tree.leaves(xs)[0].shape[0]
    row = jax.tree.map(lambda a: a[0], xs)
    y_shape, z_shape = jax.eval_shape(fn, broadcast, row)
    ys = jax.tree.map(lambda s: jnp.zeros((size,) + s.shape, s.dtype), y_shape)
    total = reduction.identity(jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), z_shape))
    if varying:
        ys, total = jax.tree.map(lambda a: jax.lax.pcast(a, AXIS, to="varying"), (ys, total))

    def body(carry, i):
        total, ys = carry
        start = jnp.minimum(i * chunk, size - chunk)
        x = jax.tree.map(lambda a: jax.lax.dynamic_slice_in_dim(a, start, chunk), xs)
        fresh = start + jnp.arange(chunk) >= i * chunk
        if valid is not None:
            fresh = fresh & jax.lax.dynamic_slice_in_dim(valid, start, chunk)
        y, z = _vmap_reduce(fn, broadcast, x, fresh, reduction)
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
        from fedjax_pfl.core import flat_execution  # noqa: PLC0415 - only for flat data
        return flat_execution.flat_map_reduce(fn, broadcast, xs, stores, execution, reduction)
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
    xs_p, valid = _pad_rows(xs, devices)  # a copy only when devices does not divide S

    def per_device(b, x, v):
        # Replicated inputs must be marked device-varying, or differentiating
        # through them inside shard_map would psum per-client gradients.
        b = jax.tree.map(lambda a: jax.lax.pcast(a, AXIS, to="varying"), b)
        if chunk == v.shape[0]:
            ys, zs = _vmap_reduce(fn, b, x, v, reduction)
        elif v.shape[0] % chunk:
            ys, zs = _overlapped_reduce(fn, b, x, chunk, reduction, valid=v, varying=True)
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
