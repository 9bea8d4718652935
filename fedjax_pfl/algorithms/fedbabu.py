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

Paper symbol -> argument: head -> `personal` (the old `head=` is accepted with
a DeprecationWarning), E -> `local_epochs`, B -> `batch_size`, fine-tuning
epochs tau -> `ft_epochs` (or `ft_steps`), its lr -> `ft_lr`.
Choices: the paper personalizes by fine-tuning the whole model (the default);
`ft_head_only=True` fine-tunes the head alone (also studied in the paper). The
fine-tuning order of client i uses `fold_in(key(ft_seed), i)`, as `fedavg_ft`.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import struct

from fedjax_pfl.core import aggregation, algorithm, config, finetune, local
from fedjax_pfl.core import partial as partial_lib
from fedjax_pfl.core import round as round_lib
from fedjax_pfl.core.algorithm import FederatedAlgorithm
from fedjax_pfl.models.model import Model


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


@dataclasses.dataclass(frozen=True, kw_only=True)
class FedBABUConfig(config.FineTuning, partial_lib.PersonalConfig):
    """FedBABU's hyperparameters: `PersonalConfig`'s (`personal`: the frozen
    head), the fine-tuning of `evaluate` (`config.FineTuning`), and:

    Attributes:
      ft_head_only: fine-tune only the head (default: the whole model).
    """

    ft_head_only: bool = config.flag(False)


@config.factory(FedBABUConfig, aliases={"head": "personal"})
def fedbabu(model: Model, cfg: FedBABUConfig) -> FederatedAlgorithm:
    """FedBABU (body federated under a frozen head, fine-tuned at evaluation)."""
    part = partial_lib.model_partition(model, cfg.personal)
    loss_fn = local.model_loss_fn(model)

    def init(key, train, params=None):
        algorithm.check_data(model, train, cfg.clients_per_round)
        head_params, body = part.split(algorithm.initial_params(model, key, params))
        return FedBABUState(jnp.zeros((), jnp.int32), body, head_params, cfg.hparams())

    def client_update(broadcast, x):
        body, head_params, hp = broadcast
        _, data, key, weight = x
        body_loss = lambda b, batch, k: loss_fn(part.merge(head_params, b), batch, k)
        result = cfg.schedule.train(body_loss, body, data, key, hp["client_lr"])
        return ({}, result.mean_loss()), aggregation.weighted_delta(result.params, body, weight)

    def round_fn(state, train, key, cohort=None):
        body, _, (losses,), n = partial_lib.averaged_round(
            cfg, client_update, (state.body, state.head, state.hparams), {}, train, key, cohort)
        metrics = {"train_loss": round_lib.mean_loss(losses, n)}
        return state.replace(round=state.round + 1, body=body), metrics

    def tune(broadcast, train_row, key):
        """ONE client's fine-tuned params (the head alone, or the whole model)."""
        body, head_params, lr = broadcast
        if cfg.ft_head_only:
            head_loss = lambda h, batch, k: loss_fn(part.merge(h, body), batch, k)
            head_params = cfg.ft_schedule.train(head_loss, head_params, train_row, key, lr).params
        else:
            whole = lambda p, batch, k: loss_fn(part.merge(*p), batch, k)
            head_params, body = cfg.ft_schedule.train(whole, (head_params, body), train_row, key,
                                                      lr).params
        return part.merge(head_params, body)

    def evaluate(state, train, test):
        broadcast = (state.body, state.head, state.hparams["ft_lr"])
        return finetune.evaluate_tuned(model, tune, broadcast, train, test, cfg.ft_seed,
                                       cfg.strategy)

    return FederatedAlgorithm(init, round_fn, evaluate)
