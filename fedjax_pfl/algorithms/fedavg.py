"""FedAvg, FedProx and FedAvg-FT: one global model averaged over the cohort.

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

FedAvg-FT trains as FedAvg; at evaluation every client fine-tunes the global
model on its own training data (the `ft_*` schedule) and is tested with the
result: the "FedAvg + local adaptation" reference point of personalized FL
(PFLlib, pFL-Bench).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import optax
from flax import struct

from fedjax_pfl.core import aggregation, config, finetune, local, server
from fedjax_pfl.core import execution as ex
from fedjax_pfl.core import round as round_lib
from fedjax_pfl.core.algorithm import FederatedAlgorithm
from fedjax_pfl.models.model import Model


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


@dataclasses.dataclass(frozen=True, kw_only=True)
class FedAvgConfig(config.ServerConfig):
    """FedAvg's hyperparameters (`config.ServerConfig`'s, and):

    Attributes:
      weighting: "num_examples" (n_i-weighted mean, McMahan) or "uniform".
      mu: FedProx proximal coefficient (traced; None: plain FedAvg).
    """

    weighting: str = config.weighting()
    mu: float | None = config.number(None, optional=True)


@dataclasses.dataclass(frozen=True, kw_only=True)
class FedProxConfig(FedAvgConfig):
    """FedProx: `FedAvgConfig` with mu = 0.01 by default."""

    mu: float | None = config.number(0.01, optional=True)


@config.factory(FedAvgConfig)
def fedavg(model: Model, cfg: FedAvgConfig) -> FederatedAlgorithm:
    """FedAvg (FedProx when `mu` is set); hyperparameters: `FedAvgConfig`."""
    schedule, execution = cfg.schedule, cfg.strategy
    loss_fn = local.model_loss_fn(model)

    def init(key, train, params=None):
        params, hp, opt_state = server.init(model, cfg, key, train, params)
        return FedAvgState(jnp.zeros((), jnp.int32), params, opt_state, hp)

    def client_update(broadcast, x):
        params, hp = broadcast
        data, key, weight = x
        penalty = None
        if cfg.mu is not None:
            penalty = lambda p: 0.5 * hp["mu"] * optax.tree.norm(optax.tree.sub(p, params),
                                                                 squared=True)
        result = schedule.train(loss_fn, params, data, key, hp["client_lr"], penalty)
        return result.mean_loss(), aggregation.weighted_delta(result.params, params, weight)

    def round_fn(state, train, key, cohort=None):
        _, data, keys, n = round_lib.start(key, train, cfg.clients_per_round, cohort)
        losses, (delta_sum, weight_sum) = ex.map_reduce(
            client_update, (state.params, state.hparams), (data, keys, cfg.weights(n)), execution)
        params, opt_state = server.step(cfg, state, delta_sum, weight_sum)
        metrics = {"train_loss": round_lib.mean_loss(losses, n)}
        return state.replace(round=state.round + 1, params=params, opt_state=opt_state), metrics

    def evaluate(state, train, test):
        del train
        return server.evaluate_shared(model, state.params, test, execution)

    return FederatedAlgorithm(init, round_fn, evaluate)


@config.factory(FedProxConfig)
def fedprox(model: Model, cfg: FedProxConfig) -> FederatedAlgorithm:
    """FedProx: FedAvg whose clients minimise f_i(w) + mu/2 ||w - w_t||^2 (mu traced)."""
    return fedavg.build(model, cfg)


@dataclasses.dataclass(frozen=True, kw_only=True)
class FedAvgFTConfig(config.FineTuning, FedAvgConfig):
    """`FedAvgConfig` plus the fine-tuning of `evaluate` (`config.FineTuning`), and:

    Attributes:
      ft_curve_steps: if set (nu_max), `evaluate` also reports the curve
        `curve_num_correct`, `curve_loss_sum` [M, nu_max + 1] of nu' plain SGD
        steps with `ft_lr` on `ft_batch_size` minibatches (`core.finetune`).
    """

    ft_curve_steps: int | None = None

    def check(self):
        if self.ft_curve_steps is not None:
            finetune.check_curve_args(self.ft_curve_steps, 0, self.ft_batch_size,
                                      prefix="ft_curve_")
        super().check()


@config.factory(FedAvgFTConfig)
def fedavg_ft(model: Model, cfg: FedAvgFTConfig) -> FederatedAlgorithm:
    """FedAvg with local fine-tuning in `evaluate`; hyperparameters: `FedAvgFTConfig`."""
    base, loss_fn = fedavg.build(model, cfg), local.model_loss_fn(model)

    def evaluate(state, train, test):
        tune = lambda b, row, key: cfg.ft_schedule.train(loss_fn, b[0], row, key, b[1]).params
        lr = state.hparams["ft_lr"]
        out = finetune.evaluate_tuned(model, tune, (state.params, lr), train, test, cfg.ft_seed,
                                      cfg.strategy)
        if cfg.ft_curve_steps is not None:
            curve = finetune.finetune_evaluate(
                model, state.params, train, test, lr, max_steps=cfg.ft_curve_steps,
                report_step=0, batch_size=cfg.ft_batch_size, seed=cfg.ft_seed,
                execution=cfg.strategy)
            out.update({k: v for k, v in curve.items() if k.startswith("curve_")})
        return out

    return FederatedAlgorithm(base.init, base.round, evaluate)

