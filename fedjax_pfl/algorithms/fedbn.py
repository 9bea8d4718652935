"""FedBN: FedAvg with every BatchNorm layer kept local to its client.

Reference:
  Li, Jiang, Zhang, Kamp, Dou, "FedBN: Federated Learning on Non-IID Features
  via Local Batch Normalization", ICLR 2021, arXiv 2102.07623.

The params are split into the BN part v_i (each BatchNorm layer's scale and
bias AND its running mean / variance; every client keeps its own, stacked
[M, ...]) and the rest u (one server copy). Each round, every cohort client
trains the merged model (v_i, u) with the standard local schedule (the
default loop of `core.local`, which also moves the running statistics, see
`Model.update_stats`), keeps its new v_i and sends u_i; the server averages
  u <- u + sum_i p_i (u_i - u) / sum_i p_i,   p_i = n_i or 1 (`weighting`).
Clients outside the cohort keep v_i bit-identical. Evaluation: client i's model
(v_i, u) in evaluation mode (normalized with ITS running statistics).

Paper symbol -> argument: the BN parameters kept local -> `personal`, K (local
iterations) -> `local_steps` / `local_epochs`, B -> `batch_size`, eta ->
`client_lr`, p_k (the averaging weights) -> `weighting`.

Choices (paper / PyTorch code vs here):
* Running variance: flax keeps the biased batch variance (divide by |B|),
  PyTorch's `running_var` the unbiased one (|B| - 1); momentum 0.1 and eps 1e-5
  as PyTorch. The batch statistic is taken after each optimizer step, from
  the new params on the step's minibatch (PyTorch: in the step's forward pass,
  before the step).
* Epoch mode's last partial minibatch: normalized (and its statistics taken)
  over its valid rows only, as PyTorch's last batch without `drop_last`. A
  batch of ONE row (PyTorch refuses it in training) has variance 0: its
  normalized values are the BN bias plus rounding noise / sqrt(eps).
* A model without BatchNorm (nothing matched by the default `personal`) runs
  FedAvg exactly (same keys, same arithmetic); an explicit `personal` label
  must match some parameter.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from fedjax_pfl.core import aggregation, algorithm, config, local
from fedjax_pfl.core import params as params_lib
from fedjax_pfl.core import partial as partial_lib
from fedjax_pfl.core import round as round_lib
from fedjax_pfl.core.algorithm import FederatedAlgorithm
from fedjax_pfl.models.model import Model

FedBNState = partial_lib.PersonalState
"""FedBN's state: `shared` the non-BN params, `client_personal` each client's BN params and
statistics (empty for a model without BatchNorm)."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class FedBNConfig(config.Config):
    """FedBN's hyperparameters (`config.Config`'s, and):

    Attributes:
      personal: the params kept local: None (every `batch_stats` leaf and every
        param of a module that has `batch_stats`, i.e. the BatchNorm layers), or
        top-level module names, a regex on "/"-joined leaf paths, or a predicate.
      weighting: server average of the rest: "num_examples" (n_i) or "uniform".
    """

    personal: params_lib.Label | None = None
    weighting: str = config.weighting()


def batch_norm_leaves(params) -> frozenset[str]:
    """The paths of `params`' BatchNorm leaves: "batch_stats/<module>/..." and
    "params/<module>/..." for every <module> with running statistics."""
    paths = [params_lib.path_name(p) for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
    modules = {p.split("/", 1)[1].rsplit("/", 1)[0] for p in paths
               if p.startswith("batch_stats/") and p.count("/") >= 2}
    return frozenset(p for p in paths if p.startswith("batch_stats/") or (
        p.startswith("params/") and p.count("/") >= 2
        and p.split("/", 1)[1].rsplit("/", 1)[0] in modules))


@config.factory(FedBNConfig)
def fedbn(model: Model, cfg: FedBNConfig) -> FederatedAlgorithm:
    """FedBN (local BatchNorm layers, averaged rest); hyperparameters: `FedBNConfig`."""
    shapes = jax.eval_shape(model.init, jax.random.key(0))
    label = cfg.personal
    if label is None:
        bn = batch_norm_leaves(shapes)
        label = bn.__contains__
    part = params_lib.partition(shapes, label, name="personal",
                                require_personal=cfg.personal is not None)
    loss_fn = local.model_loss_fn(model)

    def init(key, train, params=None):
        algorithm.check_data(model, train, cfg.clients_per_round)
        v, u = part.split(algorithm.initial_params(model, key, params))
        return FedBNState(jnp.zeros((), jnp.int32), u,
                          round_lib.replicate(v, train.num_clients), cfg.hparams())

    def client_update(broadcast, x):
        u, hp = broadcast
        v_i, data, key, weight = x
        v_i, u_i, loss = partial_lib.train_merged(cfg.schedule, loss_fn, part, v_i, u, data, key,
                                                  hp["client_lr"])
        return (v_i, loss), aggregation.weighted_delta(u_i, u, weight)

    def round_fn(state, train, key, cohort=None):
        u, v, (losses,), n = partial_lib.averaged_round(
            cfg, client_update, (state.shared, state.hparams), state.client_personal, train,
            key, cohort)
        metrics = {"train_loss": round_lib.mean_loss(losses, n)}
        return state.replace(round=state.round + 1, shared=u, client_personal=v), metrics

    def evaluate(state, train, test):
        del train
        return partial_lib.evaluate_merged(model, part.merge, state.shared,
                                           state.client_personal, test, cfg.strategy)

    return FederatedAlgorithm(init, round_fn, evaluate)
