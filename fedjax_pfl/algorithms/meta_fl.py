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
u <- u - beta g with g, by `mode`:
  "exact": prod_j (I - alpha H(w^(j); D''_j)) grad f(w^(nu); D'), by autodiff
      through a `lax.scan` of the nu steps;
  "fo": grad f(w^(nu); D') (the Hessian factors dropped);
  "hf": the factors applied backward through the stored iterates by central
      differences [grad f(w_j + delta v) - grad f(w_j - delta v)] / (2 delta)
      of the back-propagated vector v (Per-FedAvg (HF) at nu = 1).

Paper symbol -> argument: nu -> `nu`, alpha -> `inner_lr`, beta -> `client_lr`
(alias `outer_lr`), tau -> `local_steps`, D -> `inner_batch_size`, D' ->
`batch_size`, D'' -> `hessian_batch_size`, delta -> `delta`, r n ->
`clients_per_round`. D'' is drawn independently of D (Per-FedAvg, default) or
is the inner batch (`hessian_batches="shared"`, MAML-style). The server takes
the unweighted mean over the cohort (Per-FedAvg; "weighted": n_i-weighted).
Epoch mode (`local_epochs`) draws D' by epochs and D, D'' uniformly. The
evaluation fine-tunes nu' = 0..`eval_max_steps` SGD steps (`core.finetune`);
the scalar statistics are those after `eval_steps` (nu). Its step size is
alpha by default: the step the objective trains for (both objectives are the
loss after nu SGD steps of step alpha). `eval_lr` sets a separate step size for
the evaluation only (traced); it is an option of this package, not of either
paper, e.g. to tune the deployment step after training as for FedAvg-FT.
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
from fedjax_pfl.core import algorithm, config, finetune, local
from fedjax_pfl.core import execution as ex
from fedjax_pfl.core import round as round_lib
from fedjax_pfl.core.algorithm import FederatedAlgorithm
from fedjax_pfl.core.metagrad import MODES, meta_train
from fedjax_pfl.models.model import Model

HESSIAN_BATCHES = ("independent", "shared")
AGGREGATIONS = ("mean", "weighted")


@struct.dataclass
class MetaFLState:
    """Meta-FL's round, global (meta) model w (`params`); `hparams`: client_lr
    (beta), inner_lr (alpha), delta, and eval_lr when it was given (without it
    the evaluation reads inner_lr)."""

    round: jax.Array
    params: object
    hparams: dict


@dataclasses.dataclass(frozen=True, kw_only=True)
class MetaFLConfig(config.Config):
    """Meta-FL's hyperparameters (`config.Config`'s, and; symbols: module docstring):

    Attributes:
      nu: inner fine-tuning steps (static, >= 0; the scan length).
      mode: "exact", "fo" or "hf" meta-gradient.
      inner_batch_size, hessian_batch_size: D (default D' = `batch_size`), D''
        (default D').
      local_steps: tau (default 10), or `local_epochs` over D'.
      inner_lr: alpha, also the evaluation's fine-tuning step unless `eval_lr`
        is given (traced).
      client_lr: beta, the local (outer) step size (traced, default 0.001);
        `outer_lr` is the same argument under the paper's name (wins if set).
      client_optimizer: optimizer applied to the meta-gradient (default SGD).
      hessian_batches: "independent" (Per-FedAvg's D'') or "shared" (MAML).
      delta: finite-difference step of "hf" (traced).
      aggregation: "mean" over the cohort (Per-FedAvg) or n_i-"weighted".
      remat: rematerialize inner steps in "exact" mode (memory O(nu |w|)).
      eval_lr: the evaluation's fine-tuning step size (traced; None: alpha).
      eval_steps, eval_max_steps: nu' of the scalar test statistics (default
        nu) and the curve's nu_max (default max(5, eval_steps)).
      eval_batch_size, eval_full_batch, eval_seed: fine-tuning batches of the
        evaluation (default D; full local gradient; seed).
    """

    nu: int = config.integer(1, minimum=0)
    mode: str = config.choice("exact", MODES)
    inner_batch_size: int | None = config.integer(None, optional=True)
    hessian_batch_size: int | None = config.integer(None, optional=True)
    local_steps: int | None = 10
    inner_lr: float = config.number(0.01)
    client_lr: float = config.number(0.001)
    outer_lr: float | None = config.number(None, optional=True, traced=False)
    hessian_batches: str = config.choice("independent", HESSIAN_BATCHES)
    delta: float = config.number(1e-3, strict=True)
    aggregation: str = config.choice("mean", AGGREGATIONS)
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

    inner_b = property(lambda self: self.batch_size if self.inner_batch_size is None
                       else self.inner_batch_size)
    hessian_b = property(lambda self: self.batch_size if self.hessian_batch_size is None
                         else self.hessian_batch_size)
    eval_report = property(lambda self: self.nu if self.eval_steps is None else self.eval_steps)
    eval_max = property(lambda self: max(5, self.eval_report) if self.eval_max_steps is None
                        else self.eval_max_steps)
    eval_b = property(lambda self: self.inner_b if self.eval_batch_size is None
                      else self.eval_batch_size)


@config.factory(MetaFLConfig)
def meta_fl(model: Model, cfg: MetaFLConfig) -> FederatedAlgorithm:
    """nu-step meta-FL; hyperparameters: `MetaFLConfig`."""
    loss_fn = local.model_loss_fn(model)
    objective = lambda p, b: jnp.sum(b["w"] * loss_fn(p, b["examples"], None))

    def init(key, train, params=None):
        algorithm.check_data(model, train, cfg.clients_per_round)
        return MetaFLState(jnp.zeros((), jnp.int32),
                           algorithm.initial_params(model, key, params), cfg.hparams())

    def client_update(broadcast, x):
        params, hp = broadcast
        data, key, weight = x
        result = meta_train(objective, params, data, key, hp, cfg)
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
