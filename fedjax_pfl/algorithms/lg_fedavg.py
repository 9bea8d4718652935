"""LG-FedAvg: local representations, a global head (the reverse split of FedPer).

Reference:
  Liang, Liu, Ziyin, Allen, Auerbach, Brent, Salakhutdinov, Morency, "Think
  Locally, Act Globally: Federated Learning with Local and Global
  Representations", arXiv 2001.01523, 2020.

The model is split into local layers l_i (the representation: every client
keeps its own, stacked [M, ...]) and global layers g (by default the `head`,
one server copy). Each round, every cohort client trains (l_i, g) jointly on
its data, starting from its own l_i and the received g, and keeps l_i; the
server averages the global layers:
  g <- g + sum_i p_i (g_i - g) / sum_i p_i,   p_i = n_i or 1 (`weighting`).
Clients outside the cohort keep l_i bit-identical. Evaluation: client i's
model (l_i, g).

Paper symbol -> argument: global model parameters theta^g -> `global_layers`,
E -> `local_epochs`, B -> `batch_size`, eta -> `client_lr`.
Choices: the released code first trains the whole model with FedAvg and starts
LG-FedAvg from it; here that warm start is `init(key, train, params=...)` (every
l_i starts from the given params). `global_layers` may cover every parameter:
then there is no local part and LG-FedAvg is FedAvg (same client keys). The
joint step uses the client's key itself, unlike `fedper`'s phase keys.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import struct

from fedjax_pfl.core import aggregation, algorithm, config, local
from fedjax_pfl.core import params as params_lib
from fedjax_pfl.core import partial as partial_lib
from fedjax_pfl.core import round as round_lib
from fedjax_pfl.core.algorithm import FederatedAlgorithm
from fedjax_pfl.models.model import Model


@struct.dataclass
class LGFedAvgState:
    """State of LG-FedAvg.

    Attributes:
      round: int32 scalar, rounds completed.
      global_params: g, the server's global layers: flat dict {path: leaf}.
      client_local: l_i, each client's local layers (flat dict, leaves [M, ...];
        empty when `global_layers` covers the whole model).
      hparams: traced scalars: client_lr.
    """

    round: jax.Array
    global_params: dict
    client_local: dict
    hparams: dict


@dataclasses.dataclass(frozen=True, kw_only=True)
class LGFedAvgConfig(config.Config):
    """LG-FedAvg's hyperparameters (`config.Config`'s, and):

    Attributes:
      global_layers: which params are global (top-level module names, a regex on
        leaf paths, or a predicate); the rest are each client's local layers.
      weighting: "num_examples" (n_i-weighted mean of g) or "uniform".
    """

    global_layers: params_lib.Label = ("head",)
    weighting: str = config.weighting()


@config.factory(LGFedAvgConfig)
def lg_fedavg(model: Model, cfg: LGFedAvgConfig) -> FederatedAlgorithm:
    """LG-FedAvg (personal lower layers, averaged global head); see `LGFedAvgConfig`."""
    # The Partition's "personal" flag marks the matched (global) leaves here.
    part = params_lib.partition(jax.eval_shape(model.init, jax.random.key(0)), cfg.global_layers,
                                name="global_layers", require_shared=False)
    loss_fn = local.model_loss_fn(model)

    def init(key, train, params=None):
        algorithm.check_data(model, train, cfg.clients_per_round)
        g, rep = part.split(algorithm.initial_params(model, key, params))
        return LGFedAvgState(jnp.zeros((), jnp.int32), g,
                             round_lib.replicate(rep, train.num_clients), cfg.hparams())

    def client_update(broadcast, x):
        g, hp = broadcast
        l_i, data, key, weight = x
        g_i, l_i, loss = partial_lib.train_merged(cfg.schedule, loss_fn, part, g, l_i, data, key,
                                                  hp["client_lr"])
        return (l_i, loss), aggregation.weighted_delta(g_i, g, weight)

    def round_fn(state, train, key, cohort=None):
        g, rep, (losses,), n = partial_lib.averaged_round(
            cfg, client_update, (state.global_params, state.hparams), state.client_local, train,
            key, cohort)
        metrics = {"train_loss": round_lib.mean_loss(losses, n)}
        return state.replace(round=state.round + 1, global_params=g, client_local=rep), metrics

    def evaluate(state, train, test):
        del train
        return partial_lib.evaluate_merged(model, lambda rep, g: part.merge(g, rep),
                                           state.global_params, state.client_local, test,
                                           cfg.strategy)

    return FederatedAlgorithm(init, round_fn, evaluate)
