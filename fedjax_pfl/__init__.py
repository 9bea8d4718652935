"""fedjax_pfl: a JAX-vectorized simulator for personalized federated learning.

Clients are stacked on a leading axis; a whole communication round (every
client's local steps, the aggregation, per-client state updates) is one jitted
function, and blocks of rounds are one `lax.scan`.

Example:
  >>> import fedjax_pfl as fp
  >>> train, test, info = fp.data.federated_dataset(
  ...     "synthetic", num_clients=20, alpha=1.0, beta=1.0)
  >>> model = fp.models.mlp(info["input_shape"], info["num_classes"])
  >>> algo = fp.algorithms.fedavg(model, local_steps=5, client_lr=0.05)
  >>> result = fp.simulate(algo, train, test, rounds=10, progress=False)
"""

from fedjax_pfl import algorithms, callbacks, core, data, distributed, metrics, models, results
from fedjax_pfl.algorithms import ALGORITHMS
from fedjax_pfl.core.algorithm import FederatedAlgorithm
from fedjax_pfl.core.execution import Execution, client_mesh, shard_clients
from fedjax_pfl.data.client_data import ClientData
from fedjax_pfl.grid import simulate_grid
from fedjax_pfl.models.model import Model
from fedjax_pfl.results import Result
from fedjax_pfl.simulate import TrainingDiverged, run_rounds, simulate
from fedjax_pfl.sweep import sweep

__version__ = "0.1.0"


def use_cpu_devices(count: int) -> None:
    """Splits the host CPU into `count` XLA devices (for the "sharded" strategy).

    Must run before JAX initialises its backends (before the first array is
    created). Equivalent to `XLA_FLAGS=--xla_force_host_platform_device_count`.
    """
    import jax

    jax.config.update("jax_num_cpu_devices", count)


__all__ = [
    "ALGORITHMS",
    "ClientData",
    "Execution",
    "FederatedAlgorithm",
    "Model",
    "Result",
    "TrainingDiverged",
    "algorithms",
    "callbacks",
    "client_mesh",
    "core",
    "data",
    "distributed",
    "metrics",
    "models",
    "results",
    "run_rounds",
    "shard_clients",
    "simulate",
    "simulate_grid",
    "sweep",
    "use_cpu_devices",
]
