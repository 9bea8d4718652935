"""IFCA: Iterative Federated Clustering Algorithm, the hard-assignment K-model baseline.

Reference:
  Ghosh, Chung, Yin, Ramchandran, "An Efficient Framework for Clustered
  Federated Learning", NeurIPS 2020 (arXiv 2006.04088), Algorithm 2 with
  model averaging.

Each cohort client evaluates the K received models on its training data,
picks k_i = argmin_k L_i(theta_k), trains only that model (with its client key,
so K = 1 is FedAvg exactly) and the server averages each model over the
clients that chose it, weighted by n_i:
  theta_k <- theta_k + sum_{i: k_i = k} n_i (theta_i - theta_k) / sum_{i: k_i = k} n_i.
A model nobody chose is unchanged (with the default plain-SGD server; a
stateful `server_optimizer` such as momentum may still move it).

Paper symbol -> argument: k -> `num_models`, M·p -> `clients_per_round`,
tau -> `local_steps` / `local_epochs`, gamma -> `client_lr`. The paper starts
the K models from independent random inits (`init="independent"`, the
default); `"shared"` starts them equal, in which case every client picks model
0 (argmin ties break low) and IFCA reduces to FedAvg.
Evaluation: each client tests the server model with the lowest training loss;
the choice is returned as `model` [M].
"""

from __future__ import annotations

import dataclasses

from flax import struct

from fedjax_pfl.core import config, kmodels
from fedjax_pfl.core.algorithm import FederatedAlgorithm
from fedjax_pfl.models.model import Model


@struct.dataclass
class IFCAState(kmodels.KModelsState):
    """State of IFCA: `kmodels.KModelsState` (hparams: client_lr, server_lr)."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class IFCAConfig(kmodels.KModelsConfig):
    """IFCA's hyperparameters (`kmodels.KModelsConfig`'s, and):

    Attributes:
      diagnostics: add each round's client -> model assignment to the metrics
        (`metrics["diagnostics"]`: "clients" [S], "model" [S]).
    """

    diagnostics: bool = config.flag(False)


@config.factory(IFCAConfig)
def ifca(model: Model, cfg: IFCAConfig) -> FederatedAlgorithm:
    """IFCA with model averaging (n_i-weighted); hyperparameters: `IFCAConfig`."""
    round_body = kmodels.hard_assignment_round(model, cfg)

    def round_fn(state, train, key, cohort=None):
        state, metrics, (cohort, _, choices) = round_body(state, train, key, cohort)
        if cfg.diagnostics:
            metrics["diagnostics"] = {"clients": cohort.ids, "model": choices}
        return state, metrics

    return FederatedAlgorithm(
        lambda key, train, params=None: kmodels.init_state(IFCAState, model, cfg, key, train,
                                                           params),
        round_fn,
        lambda state, train, test: kmodels.evaluate_best_of(model, state.params, train, test,
                                                            cfg.strategy))
