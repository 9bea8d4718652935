"""The client axis on the device mesh, in one process or several.

`place` puts per-client `[M, ...]` arrays (data, per-client state) on the 1-D
`clients` mesh once (`simulate(..., mesh=...)`). M must divide over the devices;
otherwise one process leaves them as they are (padding M with empty clients
would change cohort sampling and the state, hence the results).

Several processes (JAX multi-controller): each calls `initialize(...)` before
JAX starts, puts only its own clients (`client_block`) on its devices as global
arrays (`place_clients`) and runs the same "sharded" program (on CPU the
cross-process collectives are gloo over TCP); only process 0 writes results.
"""

from __future__ import annotations

import contextlib
import os

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from fedjax_pfl.core.execution import AXIS, client_mesh
from fedjax_pfl.data.client_data import ClientData

ENV = {"coordinator": "FEDJAX_PFL_COORDINATOR", "num_processes": "FEDJAX_PFL_NUM_PROCESSES",
       "process_id": "FEDJAX_PFL_PROCESS_ID"}


def initialize(coordinator: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, *, local_devices: int | None = None,
               timeout_s: int = 300) -> None:
    """Joins a run of `num_processes` processes; call before JAX creates any array.

    Arguments left None come from FEDJAX_PFL_COORDINATOR ("host:port" of
    process 0, which serves it), FEDJAX_PFL_NUM_PROCESSES and
    FEDJAX_PFL_PROCESS_ID. `local_devices` splits this process's CPU into that
    many devices (see `fedjax_pfl.use_cpu_devices`). On CPU the cross-process
    collectives are gloo over TCP (JAX 0.10's default, set explicitly).
    """
    coordinator, num_processes, process_id = resolve(coordinator, num_processes, process_id)
    if local_devices is not None:
        jax.config.update("jax_num_cpu_devices", local_devices)
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes,
                               process_id=process_id, initialization_timeout=timeout_s)


def resolve(coordinator: str | None, num_processes: int | None, process_id: int | None):
    """(coordinator, N, process id): arguments, else the environment; checked."""
    coordinator = coordinator or os.environ.get(ENV["coordinator"])
    num_processes = _env_int("num_processes", num_processes)
    process_id = _env_int("process_id", process_id)
    check_processes(coordinator, num_processes, process_id)
    return coordinator, num_processes, process_id


def _env_int(name: str, value):
    if value is not None or ENV[name] not in os.environ:
        return value
    text = os.environ[ENV[name]]
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"{ENV[name]}: expected an int, got {text!r}.") from None


def check_processes(coordinator, num_processes, process_id) -> None:
    """One-line errors, naming the flag, for an inconsistent process set-up."""
    if num_processes is None:
        if process_id is not None or coordinator:
            flag = "--process-id" if process_id is not None else "--coordinator"
            raise ValueError(f"{flag}: needs --num-processes (or {ENV['num_processes']}).")
        return
    if not (isinstance(num_processes, int) and num_processes >= 1):
        raise ValueError(f"--num-processes: expected an int >= 1, got {num_processes!r}.")
    if process_id is None:
        raise ValueError(f"--process-id: expected this process's index in [0, {num_processes}) "
                         f"(or {ENV['process_id']}), got none.")
    if not (isinstance(process_id, int) and 0 <= process_id < num_processes):
        raise ValueError(f"--process-id: expected an int in [0, {num_processes}), "
                         f"got {process_id!r}.")
    host, _, port = (coordinator or "").rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"--coordinator: expected HOST:PORT of process 0 (or "
                         f"{ENV['coordinator']}), got {coordinator!r}.")


def _check_divisible(num_clients: int, mesh: Mesh) -> None:
    if num_clients % mesh.devices.size:
        raise ValueError(
            f"clients: {num_clients} clients do not split evenly over the {mesh.devices.size} "
            f"devices of {jax.process_count()} processes; use a multiple of "
            f"{mesh.devices.size} (padding with empty clients would change the run).")


def client_block(num_clients: int, mesh: Mesh | None = None) -> slice:
    """The clients [start, stop) whose rows live on this process's devices."""
    mesh = client_mesh() if mesh is None else mesh
    _check_divisible(num_clients, mesh)
    index = NamedSharding(mesh, P(AXIS)).addressable_devices_indices_map((num_clients,))
    rows = sorted((s[0].start or 0, s[0].stop or num_clients) for s in index.values())
    if any(a[1] != b[0] for a, b in zip(rows, rows[1:])):
        raise ValueError("mesh: this process's devices do not hold one contiguous block of "
                         "clients; build the mesh from jax.devices() in order.")
    return slice(rows[0][0], rows[-1][1])


def place_clients(local: ClientData, num_clients: int, mesh: Mesh | None = None) -> ClientData:
    """Global `ClientData` of `num_clients` clients from this process's block.

    `local` holds exactly the clients `client_block(num_clients)` (host or
    device arrays); N (rows per client) is padded to the largest of any
    process, so processes may build their blocks independently. Check the
    block first (`fedjax_pfl.validation.check_data(model, local)`): the
    host-side value checks of `simulate` skip arrays spread over processes.
    """
    mesh = client_mesh() if mesh is None else mesh
    block = client_block(num_clients, mesh)
    if local.num_clients != block.stop - block.start:
        raise ValueError(f"local: process {jax.process_index()} holds the clients "
                         f"[{block.start}, {block.stop}), got {local.num_clients} clients.")
    if local.is_flat:
        raise ValueError("local: the flat layout is not placed across processes yet; build "
                         "the block with layout='dense' (or --layout dense).")
    local = jax.tree.map(np.asarray, local)
    n = local.max_examples
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        n = int(np.max(multihost_utils.process_allgather(np.int32(n))))
    pad = lambda a: np.pad(a, [(0, 0), (0, n - a.shape[1])] + [(0, 0)] * (a.ndim - 2))
    local = local.replace(examples={k: pad(v) for k, v in local.examples.items()})
    sharding = NamedSharding(mesh, P(AXIS))
    return jax.tree.map(lambda a: jax.make_array_from_process_local_data(
        sharding, a, (num_clients, *a.shape[1:])), local)


def place(tree, num_clients: int, mesh: Mesh | None = None):
    """Puts the leaves with a leading axis of `num_clients` on the `clients` mesh.

    Other array leaves are replicated over the mesh, so that a jitted block sees
    the shardings it returns and compiles once. Every process passes the same
    full value (or an array placed already). When M does not divide over the
    devices the tree is left as it is (an error with several processes).
    """
    mesh = client_mesh() if mesh is None else mesh
    if num_clients % mesh.devices.size:
        return _check_divisible(num_clients, mesh) if jax.process_count() > 1 else tree
    split, whole = NamedSharding(mesh, P(AXIS)), NamedSharding(mesh, P())

    def put(a):
        if not isinstance(a, (jax.Array, np.ndarray)):
            return a
        sharding = split if a.ndim and a.shape[0] == num_clients else whole
        if isinstance(a, jax.Array) and a.sharding.is_equivalent_to(sharding, a.ndim):
            return a
        if jax.process_count() == 1:
            return jax.device_put(a, sharding)
        if isinstance(a, jax.Array) and not a.is_fully_addressable:
            return jax.jit(lambda x: x, out_shardings=sharding)(a)
        if jax.dtypes.issubdtype(a.dtype, jax.dtypes.prng_key):
            return a  # left to jit, which replicates it
        return jax.device_put(np.asarray(a), sharding)

    def put_data(d):  # a flat store is read by every client: replicated
        if not isinstance(d, ClientData) or not d.is_flat:
            return jax.tree.map(put, d)
        examples = {k: jax.device_put(v, whole) if jax.process_count() == 1 else put(v)
                    for k, v in d.examples.items()}
        return d.replace(examples=examples, num_examples=put(d.num_examples),
                         offsets=put(d.offsets))

    return jax.tree.map(put_data, tree, is_leaf=lambda a: isinstance(a, ClientData))


@contextlib.contextmanager
def together():
    """A block every process runs; if it raises ValueError/OSError on one, it raises on all
    (a collective: otherwise the others would wait for it in the run's first collective)."""
    error = None
    try:
        yield
    except (ValueError, OSError) as e:
        error = e
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        failed = np.flatnonzero(multihost_utils.process_allgather(np.int32(error is not None)))
        if error is None and failed.size:
            raise ValueError(f"process {failed[0]} stopped the run (see its error).")
    if error is not None:
        raise error


def to_host(tree):
    """`jax.device_get` that also gathers arrays spread over several processes."""
    if jax.process_count() == 1:
        return jax.device_get(tree)
    from jax.experimental import multihost_utils

    def get(a):
        if isinstance(a, jax.Array) and not (a.is_fully_addressable or a.is_fully_replicated):
            return multihost_utils.process_allgather(a, tiled=True)
        return jax.device_get(a)

    return jax.tree.map(get, tree)
