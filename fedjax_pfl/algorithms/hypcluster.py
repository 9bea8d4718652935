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

import jax
import jax.numpy as jnp
from flax import struct

from fedjax_pfl.core import aggregation, algorithm, local
from fedjax_pfl.core import execution as ex
from fedjax_pfl.core import round as round_lib
from fedjax_pfl.core.algorithm import FederatedAlgorithm
from fedjax_pfl.core.kmodels import evaluate_best_of, train_losses
from fedjax_pfl.models.model import Model

INITS = ("independent", "shared")
WEIGHTINGS = ("num_examples", "uniform")


@struct.dataclass
class HypClusterState:
    """State of HypCluster.

    Attributes:
      round: int32 scalar, rounds completed.
      params: the K hypotheses, leaves [K, ...].
      opt_state: the server optimizer's state (over the [K, ...] stack).
      assignment: f, int32 [M]: each client's hypothesis when last sampled (-1: never).
      hparams: traced scalars: client_lr, server_lr.
    """

    round: jax.Array
    params: object
    opt_state: object
    assignment: jax.Array
    hparams: dict


def hypcluster(
    model: Model,
    *,
    num_models: int = 2,
    clients_per_round: int | None = None,
    batch_size: int = 32,
    local_steps: int | None = None,
    local_epochs: int | None = None,
    client_optimizer: local.OptimizerSpec = "sgd",
    client_lr: float = 0.05,
    server_optimizer: local.OptimizerSpec = "sgd",
    server_lr: float = 1.0,
    weighting: str = "num_examples",
    init: str = "independent",
    execution: str | ex.Execution = "vmap",
) -> FederatedAlgorithm:
    """HypCluster (hard min-loss assignment, FedAvg per hypothesis).

    Args:
      model: the model.
      num_models: K (the paper's q), the number of hypotheses.
      clients_per_round: S, sampled without replacement each round (None: all).
      batch_size, local_steps, local_epochs: local schedule (default 1 epoch).
      client_optimizer, client_lr: the client optimizer and its lr (traced).
      server_optimizer, server_lr: server optimizer on each hypothesis' pseudo-gradient.
      weighting: "num_examples" (the objective's n_i) or "uniform" per-cluster means.
      init: "independent" (paper) or "shared" initialisation of the K hypotheses.
      execution: client-axis strategy.
    """
    algorithm.check_arg("num_models", num_models, isinstance(num_models, int)
                        and not isinstance(num_models, bool) and num_models >= 1, "an int >= 1")
    algorithm.check_cohort_size(clients_per_round)
    algorithm.check_number("client_lr", client_lr)
    algorithm.check_number("server_lr", server_lr)
    algorithm.check_arg("weighting", weighting, weighting in WEIGHTINGS, f"one of {WEIGHTINGS}")
    algorithm.check_arg("init", init, init in INITS, f"one of {INITS}")
    local.check_optimizer("server_optimizer", server_optimizer)
    schedule = local.LocalSchedule(batch_size, local_steps, local_epochs, client_optimizer)
    execution = ex.as_execution(execution)
    loss_fn = local.model_loss_fn(model)

    def init_fn(key, train, params=None):
        algorithm.check_data(model, train, clients_per_round)
        params = algorithm.initial_params(model, key, params, num_models=num_models,
                                          independent=init == "independent")
        hp = algorithm.hparams(client_lr=client_lr, server_lr=server_lr)
        opt_state = local.make_optimizer(server_optimizer, hp["server_lr"]).init(params)
        return HypClusterState(jnp.zeros((), jnp.int32), params, opt_state,
                               jnp.full((train.num_clients,), -1, jnp.int32), hp)

    def client_update(broadcast, x):
        params, hp = broadcast
        data, key, weight = x
        f_i = jnp.argmin(train_losses(model, params, data))  # step 1: assignment
        start = jax.tree.map(lambda a: a[f_i], params)
        result = schedule.train(loss_fn, start, data, key, hp["client_lr"])  # step 2
        one_hot = jax.nn.one_hot(f_i, num_models, dtype=jnp.float32) * weight
        delta = jax.tree.map(lambda c, s: jnp.einsum("k,...->k...", one_hot, c - s),
                             result.params, start)
        return (result.mean_loss(), f_i.astype(jnp.int32)), (delta, one_hot)

    def round_fn(state, train, key, cohort=None):
        cohort, data, keys, n = round_lib.start(key, train, clients_per_round, cohort,
                                                state_clients=state.assignment.shape[0])
        weights = n if weighting == "num_examples" else (n > 0).astype(jnp.float32)
        (losses, f), (delta_sum, weight_sum) = ex.map_reduce(
            client_update, (state.params, state.hparams), (data, keys, weights), execution)
        mean_delta = jax.tree.map(
            lambda d: aggregation.safe_div(d, weight_sum.reshape((-1,) + (1,) * (d.ndim - 1))),
            delta_sum)
        server_opt = local.make_optimizer(server_optimizer, state.hparams["server_lr"])
        params, opt_state = aggregation.server_update(server_opt, state.params, state.opt_state,
                                                      mean_delta)
        f = jnp.where(n > 0, f, cohort.take(state.assignment))  # no data: f(i) unchanged
        metrics = {"train_loss": round_lib.mean_loss(losses, n)}
        return state.replace(round=state.round + 1, params=params, opt_state=opt_state,
                             assignment=cohort.put(state.assignment, f)), metrics

    def evaluate(state, train, test):
        algorithm.check_same_clients(train.num_clients, test, "test")
        return evaluate_best_of(model, state.params, train, test, execution)

    return FederatedAlgorithm(init_fn, round_fn, evaluate)
