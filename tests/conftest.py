"""Strict JAX settings for the whole suite, and shared fixtures.

Four host CPU devices are forced before JAX starts so that the "sharded"
execution strategy is exercised on a CPU-only machine.
"""

import jax

jax.config.update("jax_num_cpu_devices", 4)
jax.config.update("jax_numpy_rank_promotion", "raise")

import pytest  # noqa: E402

from fedjax_pfl import testing  # noqa: E402

# FedAvg and Local run the whole conformance suite in the default (fast) tier;
# the other algorithms run its costly checks (marked `costly`) in the slow tier,
# which CI also runs (`make test-slow`). Every algorithm runs the cheap checks,
# including equality with its naive per-client loop, in the fast tier.
FULL_CONFORMANCE = {"fedavg", "local"}


def pytest_collection_modifyitems(items):
    for item in items:
        params = getattr(item, "callspec", None)
        name = params.params.get("name") if params else None
        if item.get_closest_marker("costly") and name not in FULL_CONFORMANCE:
            item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="session")
def tiny_train():
    """M=11 clients, 1..20 examples, clients 3 and 8 empty."""
    return testing.random_client_data(0, 11, empty=(3, 8))


@pytest.fixture(scope="session")
def tiny_test():
    return testing.random_client_data(0, 11, sample_seed=1, empty=(8,))
