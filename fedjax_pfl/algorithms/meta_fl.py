"""Generalized nu-step meta-FL, and Per-FedAvg (nu = 1).

References:
  Jamali, Saber, Bae, "A Generalized Meta Federated Learning Framework with
  Theoretical Convergence Guarantees", arXiv 2504.21327, 2025 (nu steps).
  Fallah, Mokhtari, Ozdaglar, "Personalized Federated Learning with Theoretical
  Guarantees: A Model-Agnostic Meta-Learning Approach", NeurIPS 2020
  (Per-FedAvg; the HF estimator is from their AISTATS 2020 MAML paper).

The global model w minimises (1/n) sum_i f_i(w_i^(nu)(w)) with w^(0) = w and
w^(j+1) = w^(j) - alpha grad f_i(w^(j)): every client's loss after nu SGD
fine-tuning steps (nu = 0 is FedAvg). Each of the tau local steps runs nu inner
steps on independent batches D_j, takes the outer gradient on D' and moves
u <- u - beta g with g, by `mode` (`core.metagrad`): "exact" (prod_j (I - alpha
H(w^(j); D''_j)) grad f(w^(nu); D') by autodiff through the nu steps), "fo" (the
Hessian factors dropped) or "hf" (the factors applied backward through the
stored iterates by central differences of gradients; Per-FedAvg (HF) at nu = 1).

Paper symbol -> argument: nu -> `nu`, alpha -> `inner_lr`, beta -> `client_lr`
(alias `outer_lr`), tau -> `local_steps`, D -> `inner_batch_size`, D' ->
`batch_size`, D'' -> `hessian_batch_size`, delta -> `delta`, r n ->
`clients_per_round`. D'' is drawn independently of D (Per-FedAvg, default) or
is the inner batch (`hessian_batches="shared"`, MAML-style). The server takes
the unweighted mean over the cohort (Per-FedAvg; "weighted": n_i-weighted).
Epoch mode (`local_epochs`) draws D' by epochs and D, D'' uniformly. The
evaluation fine-tunes nu' = 0..`eval_max_steps` SGD steps (`core.finetune`) and
reports the statistics after `eval_steps` (nu), with step alpha by default (the
step both objectives train for); `eval_lr` (traced) sets a separate step, an
option of this package, not of either paper (e.g. tuned after training).
The full text of 2504.21327 was not available: the nu > 1 rules above are the
generalisation of Per-FedAvg forced by the objective (a reconstruction; no
released code). Defaults alpha = 0.01, beta = 0.001, tau = 10 are Per-FedAvg's.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import struct

from fedjax_pfl.core import aggregation as agg
from fedjax_pfl.core import config, finetune, local, server
from fedjax_pfl.core import execution as ex
from fedjax_pfl.core import round as round_lib
from fedjax_pfl.core.algorithm import FederatedAlgorithm
from fedjax_pfl.core.metagrad import MODES, meta_gradient, meta_train  # noqa: F401 (re-export)
from fedjax_pfl.models.model import Model


@struct.dataclass
class MetaFLState:
    """Meta-FL's round, global model w (`params`) and `hparams` (client_lr,
    inner_lr, delta, and eval_lr when given: else the evaluation reads inner_lr)."""

    round: jax.Array
    params: object
    hparams: dict


@dataclasses.dataclass(frozen=True, kw_only=True)
class MetaFLConfig(config.Config):
    """Meta-FL's hyperparameters (`config.Config`'s, and; symbols: module docstring).

    Static: nu (the scan length), mode, the batch sizes (None: D and D'' = D',
    the evaluation's = D), hessian_batches, aggregation, remat (rematerialize
    the inner steps of "exact": memory O(nu |w|)), eval_steps (None: nu),
    eval_max_steps (None: max(5, eval_steps)), eval_full_batch, eval_seed.
    Traced: inner_lr, client_lr (`outer_lr`, the paper's name, wins if set),
    delta, eval_lr (None: inner_lr). `client_optimizer` takes the meta-gradient.
    """

    nu: int = config.integer(1, minimum=0)
    mode: str = config.choice("exact", MODES)
    inner_batch_size: int | None = config.integer(None, optional=True)
    hessian_batch_size: int | None = config.integer(None, optional=True)
    local_steps: int | None = 10
    inner_lr: float = config.number(0.01)
    client_lr: float = config.number(0.001)
    outer_lr: float | None = config.number(None, optional=True, traced=False)
    hessian_batches: str = config.choice("independent", ("independent", "shared"))
    delta: float = config.number(1e-3, strict=True)
    aggregation: str = config.choice("mean", ("mean", "weighted"))
    remat: bool = config.flag(False)
    eval_lr: float | None = config.number(None, optional=True)
    eval_steps: int | None = None
    eval_max_steps: int | None = None
    eval_batch_size: int | None = None
    eval_full_batch: bool = config.flag(False)
    eval_seed: int = config.seed()

    def check(self):
        finetune.check_curve_args(self.eval_max, self.eval_report, self.eval_b)
        super().check()

    def hparams(self) -> dict:
        hp = super().hparams()
        return hp if self.outer_lr is None else {
            **hp, "client_lr": jnp.asarray(self.outer_lr, jnp.float32)}

    # The resolved defaults of the fields that may be None.
    inner_b = property(lambda c: _or(c.inner_batch_size, c.batch_size))
    hessian_b = property(lambda c: _or(c.hessian_batch_size, c.batch_size))
    eval_report = property(lambda c: _or(c.eval_steps, c.nu))
    eval_max = property(lambda c: c.eval_max_steps if c.eval_max_steps is not None
                        else max(5, c.eval_report))
    eval_b = property(lambda c: _or(c.eval_batch_size, c.inner_b))


def _or(value, default):
    return default if value is None else value


@config.factory(MetaFLConfig)
def meta_fl(model: Model, cfg: MetaFLConfig) -> FederatedAlgorithm:
    """nu-step meta-FL; hyperparameters: `MetaFLConfig`."""
    loss_fn = local.model_loss_fn(model)

    def init(key, train, params=None):
        params, hp, _ = server.init(model, cfg, key, train, params)
        return MetaFLState(jnp.zeros((), jnp.int32), params, hp)

    def client_update(broadcast, x):
        params, hp = broadcast
        data, key, weight = x
        result = meta_train(loss_fn, params, data, key, hp, cfg)
        return result.mean_loss(), agg.weighted_delta(result.params, params, weight)

    def round_fn(state, train, key, cohort=None):
        _, data, keys, n = round_lib.start(key, train, cfg.clients_per_round, cohort)
        weights = n if cfg.aggregation == "weighted" else (n > 0).astype(jnp.float32)
        losses, (delta_sum, weight_sum) = ex.map_reduce(
            client_update, (state.params, state.hparams), (data, keys, weights), cfg.strategy)
        params = jax.tree.map(jnp.add, state.params, agg.safe_div(delta_sum, weight_sum))
        metrics = {"train_loss": round_lib.mean_loss(losses, n)}
        return state.replace(round=state.round + 1, params=params), metrics

    def evaluate(state, train, test):
        return finetune.finetune_evaluate(
            model, state.params, train, test,
            state.hparams["inner_lr" if cfg.eval_lr is None else "eval_lr"],
            max_steps=cfg.eval_max, report_step=cfg.eval_report, batch_size=cfg.eval_b,
            full_batch=cfg.eval_full_batch, seed=cfg.eval_seed, execution=cfg.strategy)

    return FederatedAlgorithm(init, round_fn, evaluate)


@config.factory(MetaFLConfig, fixed={"nu": 1}, mode="hf")
def per_fedavg(model: Model, cfg: MetaFLConfig) -> FederatedAlgorithm:
    """Per-FedAvg: `meta_fl` with nu = 1; `mode` "hf" (default), "fo" or "exact"."""
    return meta_fl.build(model, cfg)
