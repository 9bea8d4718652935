"""Federated algorithms, each a factory returning a `FederatedAlgorithm`.

`ALGORITHMS` maps a name to its factory `factory(model, **kwargs)`; the CLI,
the benchmarks and the conformance test suite are driven by it.
"""

from fedjax_pfl.algorithms.fedavg import FedAvgState, fedavg, fedprox
from fedjax_pfl.algorithms.fedavg_ft import fedavg_ft
from fedjax_pfl.algorithms.local_only import LocalState, local_only

ALGORITHMS = {
    "fedavg": fedavg,
    "fedprox": fedprox,
    "local": local_only,
    "fedavg_ft": fedavg_ft,
}

__all__ = ["ALGORITHMS", "FedAvgState", "LocalState", "fedavg", "fedavg_ft", "fedprox",
           "local_only"]
