"""FedAvg-FT: FedAvg whose evaluation first fine-tunes the global model locally.

Training is FedAvg's. At evaluation every client copies the global model,
fine-tunes it on its own training data with the `ft_*` schedule, and is tested
with the result: the standard "FedAvg + local adaptation" reference point of
personalized FL (e.g. PFLlib, pFL-Bench).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from fedjax_pfl.algorithms.fedavg import FedAvgConfig, fedavg
from fedjax_pfl.core import algorithm, config, finetune, local, sampling
from fedjax_pfl.core import execution as ex
from fedjax_pfl.core.algorithm import FederatedAlgorithm
from fedjax_pfl.models.model import Model


@dataclasses.dataclass(frozen=True, kw_only=True)
class FedAvgFTConfig(FedAvgConfig):
    """`FedAvgConfig` plus the fine-tuning of `evaluate`.

    Attributes:
      ft_steps, ft_epochs, ft_batch_size, ft_optimizer: the fine-tuning
        schedule (default one epoch; 0 steps or epochs evaluates the global
        model as it is).
      ft_lr: fine-tuning learning rate (traced; `hparams["ft_lr"]`).
      ft_seed: seed of the fine-tuning minibatch order (client i uses
        `fold_in(key(ft_seed), i)`, the same at every evaluation).
      ft_curve_steps: if set (nu_max), `evaluate` also reports the curve
        `curve_num_correct`, `curve_loss_sum` [M, nu_max + 1] of nu' plain SGD
        steps with `ft_lr` on `ft_batch_size` minibatches (`core.finetune`).
    """

    ft_steps: int | None = None
    ft_epochs: int | None = None
    ft_batch_size: int = 32
    ft_lr: float = config.number(0.05)
    ft_optimizer: local.OptimizerSpec = "sgd"
    ft_seed: int = config.seed()
    ft_curve_steps: int | None = None

    def check(self):
        self.ft_schedule  # noqa: B018 - validates it
        if self.ft_curve_steps is not None:
            finetune.check_curve_args(self.ft_curve_steps, 0, self.ft_batch_size,
                                      prefix="ft_curve_")

    @property
    def ft_schedule(self) -> local.LocalSchedule:
        return local.LocalSchedule(self.ft_batch_size, self.ft_steps, self.ft_epochs,
                                   self.ft_optimizer, prefix="ft_", allow_zero=True)


@config.factory(FedAvgFTConfig)
def fedavg_ft(model: Model, cfg: FedAvgFTConfig) -> FederatedAlgorithm:
    """FedAvg with local fine-tuning in `evaluate`; hyperparameters: `FedAvgFTConfig`."""
    schedule, execution = cfg.ft_schedule, cfg.strategy
    base = fedavg.build(model, cfg)
    loss_fn = local.model_loss_fn(model)
    ft_seed, ft_curve_steps, ft_batch_size = cfg.ft_seed, cfg.ft_curve_steps, cfg.ft_batch_size

    def evaluate(state, train, test):
        algorithm.check_same_clients(train.num_clients, test, "test")
        keys = sampling.client_keys(jax.random.key(ft_seed), jnp.arange(train.num_clients))

        def client(broadcast, x):
            params, lr = broadcast
            train_row, test_row, key = x
            tuned = schedule.train(loss_fn, params, train_row, key, lr).params
            return local.evaluate_client(model, tuned, test_row)

        out = ex.map_clients(client, (state.params, state.hparams["ft_lr"]),
                             (train, test, keys), execution)
        if ft_curve_steps is not None:
            curve = finetune.finetune_evaluate(
                model, state.params, train, test, state.hparams["ft_lr"],
                max_steps=ft_curve_steps, report_step=0, batch_size=ft_batch_size,
                seed=ft_seed, execution=execution)
            out.update({k: v for k, v in curve.items() if k.startswith("curve_")})
        return out

    return FederatedAlgorithm(base.init, base.round, evaluate)

