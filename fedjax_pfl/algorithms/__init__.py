"""Federated algorithms, each a factory returning a `FederatedAlgorithm`.

`ALGORITHMS` maps a name to its factory `factory(model, **kwargs)`; the CLI,
the benchmarks and the conformance test suite are driven by it.
"""

from fedjax_pfl.algorithms.apfl import APFLState, apfl
from fedjax_pfl.algorithms.cfl import CFLState, cfl
from fedjax_pfl.algorithms.ditto import DittoState, ditto
from fedjax_pfl.algorithms.fedapm import FedAPMState, fedapm
from fedjax_pfl.algorithms.fedavg import FedAvgState, fedavg, fedavg_ft, fedprox
from fedjax_pfl.algorithms.fedbabu import FedBABUState, fedbabu
from fedjax_pfl.algorithms.fedbn import FedBNState, fedbn
from fedjax_pfl.algorithms.fedem import FedEMState, fedem
from fedjax_pfl.algorithms.fedfew import FedFewState, fedfew
from fedjax_pfl.algorithms.fedrod import FedRoDState, fedrod
from fedjax_pfl.algorithms.hypcluster import HypClusterState, hypcluster
from fedjax_pfl.algorithms.ifca import IFCAState, ifca
from fedjax_pfl.algorithms.lg_fedavg import LGFedAvgState, lg_fedavg
from fedjax_pfl.algorithms.local_only import LocalState, local_only
from fedjax_pfl.algorithms.meta_fl import MetaFLState, meta_fl, per_fedavg
from fedjax_pfl.algorithms.partial import PartialState, fedalt, fedper, fedrep, fedsim
from fedjax_pfl.algorithms.pfedme import PFedMeState, pfedme
from fedjax_pfl.algorithms.scaffold import SCAFFOLDState, scaffold

ALGORITHMS = {
    # Reference points.
    "fedavg": fedavg,
    "fedprox": fedprox,
    "local": local_only,
    "fedavg_ft": fedavg_ft,
    "scaffold": scaffold,
    # K shared models.
    "fedfew": fedfew,
    "ifca": ifca,
    "hypcluster": hypcluster,
    "fedem": fedem,
    "cfl": cfl,
    # Regularized / interpolated personal models.
    "ditto": ditto,
    "apfl": apfl,
    # Meta-learning.
    "meta_fl": meta_fl,
    "per_fedavg": per_fedavg,
    "pfedme": pfedme,
    # Partial model personalization.
    "fedapm": fedapm,
    "fedalt": fedalt,
    "fedsim": fedsim,
    "fedrep": fedrep,
    "fedper": fedper,
    "lg_fedavg": lg_fedavg,
    "fedbabu": fedbabu,
    "fedrod": fedrod,
    "fedbn": fedbn,
}

__all__ = [
    "ALGORITHMS",
    "APFLState",
    "CFLState",
    "DittoState",
    "FedAPMState",
    "FedAvgState",
    "FedBABUState",
    "FedBNState",
    "FedEMState",
    "FedFewState",
    "FedRoDState",
    "HypClusterState",
    "IFCAState",
    "LGFedAvgState",
    "LocalState",
    "MetaFLState",
    "PFedMeState",
    "PartialState",
    "SCAFFOLDState",
    "apfl",
    "cfl",
    "ditto",
    "fedalt",
    "fedapm",
    "fedavg",
    "fedavg_ft",
    "fedbabu",
    "fedbn",
    "fedem",
    "fedfew",
    "fedper",
    "fedprox",
    "fedrep",
    "fedrod",
    "fedsim",
    "hypcluster",
    "ifca",
    "lg_fedavg",
    "local_only",
    "meta_fl",
    "per_fedavg",
    "pfedme",
    "scaffold",
]
