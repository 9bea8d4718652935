"""FedAvg and FedProx: one global model averaged over the cohort.

References:
  McMahan et al., "Communication-Efficient Learning of Deep Networks from
  Decentralized Data", AISTATS 2017 (FedAvg).
  Li et al., "Federated Optimization in Heterogeneous Networks", MLSys 2020
  (FedProx: local objective f_i(w) + mu/2 ||w - w_t||^2).

Paper symbol -> argument: C·M -> `clients_per_round`, E -> `local_epochs`,
B -> `batch_size`, eta -> `client_lr`, mu -> `mu` (FedProx). The server step
applies `server_optimizer` to the pseudo-gradient w_t - sum_i p_i w_i with p_i
proportional to n_i (or uniform); `optax.sgd(1.0)` (the default) is plain
averaging, other choices give FedAdam/FedYogi-style servers.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from flax import struct

from fedjax_pfl.core import aggregation, algorithm, local
from fedjax_pfl.core import execution as ex
from fedjax_pfl.core import round as round_lib
from fedjax_pfl.core.algorithm import FederatedAlgorithm
from fedjax_pfl.models.model import Model

WEIGHTINGS = ("num_examples", "uniform")


@struct.dataclass
class FedAvgState:
    """State of FedAvg / FedProx / FedAvg-FT.

    Attributes:
      round: int32 scalar, rounds completed.
      params: the global model.
      opt_state: the server optimizer's state.
      hparams: traced scalars: client_lr, server_lr (and mu, ft_lr when used).
    """

    round: jax.Array
    params: object
    opt_state: object
    hparams: dict


def fedavg(
    model: Model,
    *,
    clients_per_round: int | None = None,
    batch_size: int = 32,
    local_steps: int | None = None,
    local_epochs: int | None = None,
    client_optimizer: local.OptimizerSpec = "sgd",
    client_lr: float = 0.05,
    server_optimizer: local.OptimizerSpec = "sgd",
    server_lr: float = 1.0,
    weighting: str = "num_examples",
    execution: str | ex.Execution = "vmap",
    mu: float | None = None,
) -> FederatedAlgorithm:
    """FedAvg (FedProx when `mu` is set).

    Args:
      model: the model.
      clients_per_round: S, sampled without replacement each round (None: all).
      batch_size, local_steps, local_epochs: local schedule (default 1 epoch).
      client_optimizer: optax name, `lr -> optimizer` factory or optimizer.
      client_lr: the client learning rate (traced; sweepable).
      server_optimizer, server_lr: server optimizer on the pseudo-gradient.
      weighting: "num_examples" (n_i-weighted mean, McMahan) or "uniform".
      execution: client-axis strategy ("vmap", "chunked", "sharded" or an
        `Execution`).
      mu: FedProx proximal coefficient (None: plain FedAvg).
    """
    algorithm.check_cohort_size(clients_per_round)
    algorithm.check_number("client_lr", client_lr)
    algorithm.check_number("server_lr", server_lr)
    algorithm.check_arg("weighting", weighting, weighting in WEIGHTINGS, f"one of {WEIGHTINGS}")
    if mu is not None:
        algorithm.check_number("mu", mu)
    local.check_optimizer("server_optimizer", server_optimizer)
    schedule = local.LocalSchedule(batch_size, local_steps, local_epochs, client_optimizer)
    execution = ex.as_execution(execution)
    loss_fn = local.model_loss_fn(model)
    extra = {} if mu is None else {"mu": mu}

    def init(key, train, params=None):
        algorithm.check_data(model, train, clients_per_round)
        params = algorithm.initial_params(model, key, params)
        hp = algorithm.hparams(client_lr=client_lr, server_lr=server_lr, **extra)
        opt_state = local.make_optimizer(server_optimizer, hp["server_lr"]).init(params)
        return FedAvgState(jnp.zeros((), jnp.int32), params, opt_state, hp)

    def client_update(broadcast, x):
        params, hp = broadcast
        data, key, weight = x
        penalty = None
        if mu is not None:
            penalty = lambda p: 0.5 * hp["mu"] * optax.tree.norm(optax.tree.sub(p, params),
                                                                 squared=True)
        result = schedule.train(loss_fn, params, data, key, hp["client_lr"], penalty)
        return result.mean_loss(), aggregation.weighted_delta(result.params, params, weight)

    def round_fn(state, train, key, cohort=None):
        _, data, keys, n = round_lib.start(key, train, clients_per_round, cohort)
        weights = n if weighting == "num_examples" else (n > 0).astype(jnp.float32)
        losses, (delta_sum, weight_sum) = ex.map_reduce(
            client_update, (state.params, state.hparams), (data, keys, weights), execution)
        server_opt = local.make_optimizer(server_optimizer, state.hparams["server_lr"])
        params, opt_state = aggregation.server_update(
            server_opt, state.params, state.opt_state, aggregation.safe_div(delta_sum, weight_sum))
        metrics = {"train_loss": round_lib.mean_loss(losses, n)}
        return state.replace(round=state.round + 1, params=params, opt_state=opt_state), metrics

    def evaluate(state, train, test):
        del train
        return evaluate_shared(model, state.params, test, execution)

    return FederatedAlgorithm(init, round_fn, evaluate)


def fedprox(model: Model, *, mu: float = 0.01, **kwargs) -> FederatedAlgorithm:
    """FedProx: FedAvg whose clients minimise f_i(w) + mu/2 ||w - w_t||^2.

    Args:
      model: the model.
      mu: the proximal coefficient (traced; `hparams["mu"]`).
      **kwargs: as for `fedavg`.
    """
    return fedavg(model, mu=mu, **kwargs)


def evaluate_shared(model: Model, params, test, execution: ex.Execution):
    """Per-client test statistics [M] of one model shared by every client."""
    return ex.map_clients(lambda p, d: local.evaluate_client(model, p, d), params, test, execution)

