"""FedBABU: federate the body with a frozen random head; fine-tune to personalize.

Reference:
  Oh, Kim, Yun, "FedBABU: Toward Enhanced Representation for Federated Image
  Classification", ICLR 2022 (arXiv 2106.06042).

The head (classifier) keeps its random initialization for the whole training:
every cohort client trains only the body theta_body (head frozen, gradients
not applied) and the server averages the bodies,
  theta_body <- theta_body + sum_i p_i (theta_body^i - theta_body) / sum_i p_i,
p_i = n_i or 1 (`weighting`). At evaluation every client fine-tunes the global
model on its own training data (the `ft_*` schedule) and is tested with the
result.

Paper symbol -> argument: head -> `head`, E -> `local_epochs`, B ->
`batch_size`, fine-tuning epochs tau -> `ft_epochs` (or `ft_steps`), its lr ->
`ft_lr`.
Choices: the paper personalizes by fine-tuning the whole model (the default);
`ft_head_only=True` fine-tunes the head alone (also studied in the paper). The
fine-tuning order of client i uses `fold_in(key(ft_seed), i)`, as `fedavg_ft`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct

from fedjax_pfl.core import aggregation, algorithm, local, sampling
from fedjax_pfl.core import execution as ex
from fedjax_pfl.core import params as params_lib
from fedjax_pfl.core import round as round_lib
from fedjax_pfl.core.algorithm import FederatedAlgorithm
from fedjax_pfl.models.model import Model

WEIGHTINGS = ("num_examples", "uniform")


@struct.dataclass
class FedBABUState:
    """State of FedBABU.

    Attributes:
      round: int32 scalar, rounds completed.
      body: the federated body: flat dict {path: leaf}.
      head: the frozen head (its initialization): flat dict {path: leaf}.
      hparams: traced scalars: client_lr, ft_lr.
    """

    round: jax.Array
    body: dict
    head: dict
    hparams: dict


def fedbabu(
    model: Model,
    *,
    head=("head",),
    clients_per_round: int | None = None,
    batch_size: int = 32,
    local_steps: int | None = None,
    local_epochs: int | None = None,
    client_optimizer: local.OptimizerSpec = "sgd",
    client_lr: float = 0.05,
    weighting: str = "num_examples",
    ft_steps: int | None = None,
    ft_epochs: int | None = None,
    ft_batch_size: int = 32,
    ft_lr: float = 0.05,
    ft_optimizer: local.OptimizerSpec = "sgd",
    ft_seed: int = 0,
    ft_head_only: bool = False,
    execution: str | ex.Execution = "vmap",
) -> FederatedAlgorithm:
    """FedBABU (body federated under a frozen head, fine-tuned at evaluation).

    Args:
      model: the model.
      head: which params form the frozen head (module names, regex or predicate).
      clients_per_round: S, sampled without replacement each round (None: all).
      batch_size, local_steps, local_epochs: local schedule (default 1 epoch).
      client_optimizer, client_lr: the client optimizer and its lr (traced).
      weighting: "num_examples" (n_i-weighted mean of the bodies) or "uniform".
      ft_steps, ft_epochs, ft_batch_size, ft_optimizer: the fine-tuning schedule
        (default one epoch; 0 evaluates the global model as it is).
      ft_lr: fine-tuning learning rate (traced; `hparams["ft_lr"]`).
      ft_seed: seed of the fine-tuning minibatch order.
      ft_head_only: fine-tune only the head (default: the whole model).
      execution: client-axis strategy.
    """
    algorithm.check_cohort_size(clients_per_round)
    algorithm.check_number("client_lr", client_lr)
    algorithm.check_number("ft_lr", ft_lr)
    algorithm.check_arg("weighting", weighting, weighting in WEIGHTINGS, f"one of {WEIGHTINGS}")
    algorithm.check_arg("ft_head_only", ft_head_only, isinstance(ft_head_only, bool), "a bool")
    ft_seed = algorithm.check_seed("ft_seed", ft_seed)
    part = params_lib.partition(jax.eval_shape(model.init, jax.random.key(0)), head, name="head")
    schedule = local.LocalSchedule(batch_size, local_steps, local_epochs, client_optimizer)
    ft_schedule = local.LocalSchedule(ft_batch_size, ft_steps, ft_epochs, ft_optimizer,
                                      prefix="ft_", allow_zero=True)
    execution = ex.as_execution(execution)
    loss_fn = local.model_loss_fn(model)

    def init(key, train, params=None):
        algorithm.check_data(model, train, clients_per_round)
        head_params, body = part.split(algorithm.initial_params(model, key, params))
        return FedBABUState(jnp.zeros((), jnp.int32), body, head_params,
                            algorithm.hparams(client_lr=client_lr, ft_lr=ft_lr))

    def client_update(broadcast, x):
        body, head_params, hp = broadcast
        data, key, weight = x
        body_loss = lambda b, batch, k: loss_fn(part.merge(head_params, b), batch, k)
        result = schedule.train(body_loss, body, data, key, hp["client_lr"])
        return result.mean_loss(), aggregation.weighted_delta(result.params, body, weight)

    def round_fn(state, train, key, cohort=None):
        _, data, keys, n = round_lib.start(key, train, clients_per_round, cohort)
        weights = n if weighting == "num_examples" else (n > 0).astype(jnp.float32)
        losses, (delta_sum, weight_sum) = ex.map_reduce(
            client_update, (state.body, state.head, state.hparams), (data, keys, weights),
            execution)
        body = jax.tree.map(jnp.add, state.body, aggregation.safe_div(delta_sum, weight_sum))
        metrics = {"train_loss": round_lib.mean_loss(losses, n)}
        return state.replace(round=state.round + 1, body=body), metrics

    def evaluate(state, train, test):
        algorithm.check_same_clients(train.num_clients, test, "test")
        keys = sampling.client_keys(jax.random.key(ft_seed), jnp.arange(train.num_clients))

        def client(broadcast, x):
            body, head_params, lr = broadcast
            train_row, test_row, key = x
            if ft_head_only:
                head_loss = lambda h, batch, k: loss_fn(part.merge(h, body), batch, k)
                head_params = ft_schedule.train(head_loss, head_params, train_row, key, lr).params
            else:
                whole = lambda p, batch, k: loss_fn(part.merge(*p), batch, k)
                head_params, body = ft_schedule.train(whole, (head_params, body), train_row, key,
                                                      lr).params
            return local.evaluate_client(model, part.merge(head_params, body), test_row)

        return ex.map_clients(client, (state.body, state.head, state.hparams["ft_lr"]),
                              (train, test, keys), execution)

    return FederatedAlgorithm(init, round_fn, evaluate)
