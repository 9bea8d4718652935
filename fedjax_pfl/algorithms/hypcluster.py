"""HypCluster: K hypotheses, each client served by the one with the lowest loss.

Reference:
  Mansour, Mohri, Ro, Suresh, "Three Approaches for Personalization with
  Applications to Federated Learning", arXiv 2002.10619, 2020 (user
  clustering: the HypCluster algorithm).

The objective is min_{h_1..h_K} sum_i (n_i / n) min_k L_i(h_k). Each round:
  1. every cohort client i computes f(i) = argmin_k L_i(h_k) on its training
     data with the K received hypotheses;
  2. each hypothesis runs a FedAvg step over the clients assigned to it: client
     i trains h_{f(i)} locally and the server sets
       h_k <- h_k + sum_{f(i) = k} p_i (h_i - h_k) / sum_{f(i) = k} p_i,
     p_i = n_i (the objective's weights) or 1 (`weighting="uniform"`).
A hypothesis no cohort client chose is unchanged (plain-SGD server).

Paper symbol -> argument: q (number of hypotheses) -> `num_models`,
`clients_per_round`, the inner FedAvg's schedule -> `batch_size`,
`local_steps` / `local_epochs`, `client_lr`.
Choices: the paper initializes the hypotheses at random (`init="independent"`,
the default; "shared" starts them equal, so every client picks model 0 and
HypCluster is FedAvg). The paper re-assigns only the sampled clients, so f
persists: it is kept in the state (`assignment` [M], -1 until a client with
data is first sampled). Evaluation follows the paper's final assignment step:
every client is tested with argmin_k of its training loss (returned as
`model`). Compared with IFCA (the same hard assignment), the server averages
whole models with the objective's n_i weights, and there is no weight-sharing
variant.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import struct

from fedjax_pfl.core import config, kmodels
from fedjax_pfl.core.algorithm import FederatedAlgorithm
from fedjax_pfl.models.model import Model


@struct.dataclass
class HypClusterState(kmodels.KModelsState):
    """State of HypCluster: `kmodels.KModelsState` (hparams: client_lr, server_lr), and

    Attributes:
      assignment: f, int32 [M]: each client's hypothesis when last sampled (-1: never).
    """

    assignment: jax.Array


@dataclasses.dataclass(frozen=True, kw_only=True)
class HypClusterConfig(kmodels.KModelsConfig):
    """HypCluster's hyperparameters (`kmodels.KModelsConfig`'s, K = q = 2 by default, and):

    Attributes:
      weighting: "num_examples" (the objective's n_i) or "uniform" per-cluster means.
    """

    num_models: int = config.integer(2)
    weighting: str = config.weighting()


@config.factory(HypClusterConfig)
def hypcluster(model: Model, cfg: HypClusterConfig) -> FederatedAlgorithm:
    """HypCluster (hard min-loss assignment, FedAvg per hypothesis); `HypClusterConfig`."""
    round_body = kmodels.hard_assignment_round(model, cfg)  # steps 1 and 2

    def init(key, train, params=None):
        return kmodels.init_state(HypClusterState, model, cfg, key, train, params,
                                  assignment=jnp.full((train.num_clients,), -1, jnp.int32))

    def round_fn(state, train, key, cohort=None):
        state, metrics, (cohort, n, f) = round_body(
            state, train, key, cohort, state_clients=state.assignment.shape[0])
        f = jnp.where(n > 0, f, cohort.take(state.assignment))  # no data: f(i) unchanged
        return state.replace(assignment=cohort.put(state.assignment, f)), metrics

    def evaluate(state, train, test):
        return kmodels.evaluate_best_of(model, state.params, train, test, cfg.strategy)

    return FederatedAlgorithm(init, round_fn, evaluate)
