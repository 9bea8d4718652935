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


@struct.dataclass
class IFCAState:
    """State of IFCA.

    Attributes:
      round: int32 scalar, rounds completed.
      params: the K server models, leaves [K, ...].
      opt_state: the server optimizer's state (over the [K, ...] stack).
      hparams: traced scalars: client_lr, server_lr.
    """

    round: jax.Array
    params: object
    opt_state: object
    hparams: dict


def ifca(
    model: Model,
    *,
    num_models: int = 3,
    clients_per_round: int | None = None,
    batch_size: int = 32,
    local_steps: int | None = None,
    local_epochs: int | None = None,
    client_optimizer: local.OptimizerSpec = "sgd",
    client_lr: float = 0.05,
    server_optimizer: local.OptimizerSpec = "sgd",
    server_lr: float = 1.0,
    init: str = "independent",
    execution: str | ex.Execution = "vmap",
    diagnostics: bool = False,
) -> FederatedAlgorithm:
    """IFCA with model averaging.

    Args:
      model: the model.
      num_models: K, the number of cluster models.
      clients_per_round: S, sampled without replacement each round (None: all).
      batch_size, local_steps, local_epochs: local schedule (default 1 epoch).
      client_optimizer, client_lr: the client optimizer and its lr (traced).
      server_optimizer, server_lr: server optimizer on each model's pseudo-gradient.
      init: "independent" (paper) or "shared" initialisation of the K models.
      execution: client-axis strategy.
      diagnostics: add each round's client -> model assignment to the metrics
        (`metrics["diagnostics"]`: "clients" [S], "model" [S]).
    """
    algorithm.check_arg("num_models", num_models, isinstance(num_models, int)
                        and not isinstance(num_models, bool) and num_models >= 1, "an int >= 1")
    algorithm.check_cohort_size(clients_per_round)
    algorithm.check_number("client_lr", client_lr)
    algorithm.check_number("server_lr", server_lr)
    algorithm.check_arg("init", init, init in INITS, f"one of {INITS}")
    local.check_optimizer("server_optimizer", server_optimizer)
    algorithm.check_arg("diagnostics", diagnostics, isinstance(diagnostics, bool), "a bool")
    schedule = local.LocalSchedule(batch_size, local_steps, local_epochs, client_optimizer)
    execution = ex.as_execution(execution)
    loss_fn = local.model_loss_fn(model)

    def init_fn(key, train, params=None):
        algorithm.check_data(model, train, clients_per_round)
        params = algorithm.initial_params(model, key, params, num_models=num_models,
                                          independent=init == "independent")
        hp = algorithm.hparams(client_lr=client_lr, server_lr=server_lr)
        opt_state = local.make_optimizer(server_optimizer, hp["server_lr"]).init(params)
        return IFCAState(jnp.zeros((), jnp.int32), params, opt_state, hp)

    def client_update(broadcast, x):
        params, hp = broadcast
        data, key = x
        choice = jnp.argmin(train_losses(model, params, data))
        start = jax.tree.map(lambda a: a[choice], params)
        result = schedule.train(loss_fn, start, data, key, hp["client_lr"])
        n = data.num_examples.astype(jnp.float32)
        one_hot = jax.nn.one_hot(choice, num_models, dtype=jnp.float32) * n
        delta = jax.tree.map(lambda c, s: jnp.einsum("k,...->k...", one_hot, c - s),
                             result.params, start)
        return (result.mean_loss(), choice), (delta, one_hot)

    def round_fn(state, train, key, cohort=None):
        cohort, data, keys, n = round_lib.start(key, train, clients_per_round, cohort)
        (losses, choices), (delta_sum, weight_sum) = ex.map_reduce(
            client_update, (state.params, state.hparams), (data, keys), execution)
        mean_delta = jax.tree.map(
            lambda d: aggregation.safe_div(d, weight_sum.reshape((-1,) + (1,) * (d.ndim - 1))),
            delta_sum)
        server_opt = local.make_optimizer(server_optimizer, state.hparams["server_lr"])
        params, opt_state = aggregation.server_update(server_opt, state.params, state.opt_state,
                                                      mean_delta)
        metrics = {"train_loss": round_lib.mean_loss(losses, n)}
        if diagnostics:
            metrics["diagnostics"] = {"clients": cohort.ids, "model": choices}
        return state.replace(round=state.round + 1, params=params, opt_state=opt_state), metrics

    def evaluate(state, train, test):
        algorithm.check_same_clients(train.num_clients, test, "test")
        return evaluate_best_of(model, state.params, train, test, execution)

    return FederatedAlgorithm(init_fn, round_fn, evaluate)
