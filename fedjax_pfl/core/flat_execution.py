"""The client axis over flat `ClientData` (long-tailed sizes): size classes.

Imported by `execution.map_reduce` only when a flat store is among the
per-client inputs. The store is passed to every client unbatched (replicated
under "sharded"), each client's view being its offset and count. Clients run
ordered by size class (capacities 16, 64, 256, ..., the largest client) in
groups of at most `chunk_size` (`FLAT_CHUNK` under "vmap") that shrink as the
class grows, each group seeing its class's capacity: epoch-mode training and
evaluation cost what each client's data costs, not what the largest client's
would.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from fedjax_pfl.core import execution as ex
from fedjax_pfl.core.reductions import Reduction

_is_data = ex._is_data


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
            out, zs = ex._vmap_reduce(f, broadcast, group(xs, p, subs[b]), group(valid, p, subs[b]),
                                   reduction)
            ys = jax.tree.map(lambda a, y: jax.lax.dynamic_update_slice_in_dim(a, y, p, 0), ys,
                              out)
            return p + subs[b], ys, reduction.combine(total, zs) if jax.tree.leaves(zs) else total
        return run

    branches = [branch(b) for b in range(len(ladder))]
    one = jax.tree.map(lambda a: a[:1], (xs, valid))
    y_shape, z_shape = jax.eval_shape(lambda x, v: ex._vmap_reduce(
        lambda bc, c: fn(bc[0], _with_stores(c, bc[1], ladder[0])), broadcast, x, v, reduction),
        *one)
    start = (jnp.zeros((), jnp.int32),
             jax.tree.map(lambda t: jnp.zeros((size + chunk,) + t.shape[1:], t.dtype), y_shape),
             reduction.identity(jax.tree.map(lambda t: jnp.zeros(t.shape, t.dtype), z_shape)))
    if varying:
        start = jax.tree.map(lambda a: jax.lax.pcast(a, ex.AXIS, to="varying"), start)

    def body(carry):
        p = carry[0]
        fits = [jnp.max(jnp.where(group(valid, p, n), group(classes, p, n), 0)) <= b
                for b, n in enumerate(subs)]
        return jax.lax.switch(jnp.argmax(jnp.stack(fits)), branches, *carry)

    _, ys, total = jax.lax.while_loop(lambda c: c[0] < size, body, start)
    return jax.tree.map(lambda a: a[:size], ys), total


def flat_map_reduce(fn, broadcast, xs, stores, execution: ex.Execution, reduction: Reduction):
    """`execution.map_reduce` with flat data: clients sorted by size class, run in classed groups.

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
        mesh = execution.mesh or ex.client_mesh()
        devices = mesh.devices.size
    xs_p, valid = ex._pad_rows(xs, devices)
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
            b = jax.tree.map(lambda a: jax.lax.pcast(a, ex.AXIS, to="varying"), b)
            ys, zs = fn_b(b, x, v, c, chunk, True)
            return ys, reduction.across(zs, ex.AXIS) if jax.tree.leaves(zs) else zs

        clients = P(ex.AXIS)
        ys, total = jax.shard_map(per_device, mesh=mesh,
                                  in_specs=(P(), clients, clients, clients),
                                  out_specs=(clients, P()))((broadcast, stores), xs_s, valid_s,
                                                            classes)
    back = jnp.argsort(order)
    return jax.tree.map(lambda a: a[back][:size], ys), total
