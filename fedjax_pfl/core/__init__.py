"""The engine: algorithm protocol, sampling, local training, execution strategies."""

from fedjax_pfl.core.algorithm import FederatedAlgorithm
from fedjax_pfl.core.evaluation import evaluate_client
from fedjax_pfl.core.execution import Execution, client_mesh, map_clients, map_reduce, shard_clients
from fedjax_pfl.core.local import LocalResult, LocalSchedule, local_train
from fedjax_pfl.core.sampling import client_keys, put, sample_cohort, take

__all__ = [
    "Execution",
    "FederatedAlgorithm",
    "LocalResult",
    "LocalSchedule",
    "client_keys",
    "client_mesh",
    "evaluate_client",
    "local_train",
    "map_clients",
    "map_reduce",
    "put",
    "sample_cohort",
    "shard_clients",
    "take",
]
