"""Strict JAX settings for the whole suite, and shared fixtures.

Four host CPU devices are forced before JAX starts so that the "sharded"
execution strategy is exercised on a CPU-only machine.
"""

import jax

jax.config.update("jax_num_cpu_devices", 4)
jax.config.update("jax_numpy_rank_promotion", "raise")

import os  # noqa: E402

import pytest  # noqa: E402

from fedjax_pfl import testing  # noqa: E402

# Every algorithm runs the cheap conformance checks in the default (fast) tier:
# equality with its naive per-client loop, simulate with checkpoints and resume,
# and the CLI. The costly ones (marked `costly`: other execution strategies,
# flat layout, padding, scan blocks, ...) run in the slow tier, which CI also
# runs (`make test-slow`), except for the algorithms named here.
FULL_CONFORMANCE: set[str] = set()


def pytest_collection_modifyitems(items):
    for item in items:
        params = getattr(item, "callspec", None)
        name = params.params.get("name") if params else None
        if item.get_closest_marker("costly") and name not in FULL_CONFORMANCE:
            item.add_marker(pytest.mark.slow)
        if isinstance(name, str):  # one algorithm's tests on one worker share its compiles
            item.add_marker(pytest.mark.xdist_group(name))


# Every compiled XLA:CPU executable keeps its JIT code mapped (about three
# memory maps each) for as long as JAX caches it. A pytest-xdist worker that
# compiles thousands of programs reaches the kernel's vm.max_map_count (65530
# by default) and segfaults inside the next compile; CI lost two workers this
# way. Drop JAX's caches whenever a worker holds more than a third of that.
_MAX_MAPS = 20_000


def _num_maps():
    try:
        with open(f"/proc/{os.getpid()}/maps", "rb") as f:
            return sum(1 for _ in f)
    except OSError:  # not Linux
        return 0


@pytest.fixture(autouse=True)
def _bounded_executable_cache():
    yield
    if _num_maps() > _MAX_MAPS:
        jax.clear_caches()


@pytest.fixture(scope="session")
def tiny_train():
    """M=11 clients, 1..20 examples, clients 3 and 8 empty."""
    return testing.random_client_data(0, 11, empty=(3, 8))


@pytest.fixture(scope="session")
def tiny_test():
    return testing.random_client_data(0, 11, sample_seed=1, empty=(8,))
