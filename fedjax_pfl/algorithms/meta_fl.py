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

import inspect

import jax
import jax.numpy as jnp
import optax
from flax import struct

from fedjax_pfl.core import aggregation as agg
from fedjax_pfl.core import algorithm, finetune, local
from fedjax_pfl.core import execution as ex
from fedjax_pfl.core import round as round_lib
from fedjax_pfl.core.algorithm import FederatedAlgorithm
from fedjax_pfl.core.metagrad import MODES, meta_gradient
from fedjax_pfl.data.client_data import client_capacity, client_rows
from fedjax_pfl.models.model import Model

HESSIAN_BATCHES = ("independent", "shared")
AGGREGATIONS = ("mean", "weighted")


@struct.dataclass
class MetaFLState:
    """Attributes:
      round: int32 scalar, rounds completed.
      params: the global (meta) model w.
      hparams: traced scalars: client_lr (beta), inner_lr (alpha), delta, and
        eval_lr when it was given (without it the evaluation reads inner_lr).
    """

    round: jax.Array
    params: object
    hparams: dict


def meta_batches(key, num_examples, max_examples: int, *, nu: int, batch_size: int,
                 inner_batch_size: int, hessian_batch_size: int, local_steps, local_epochs,
                 shared_hessian: bool):
    """One client's batch indices for a round.

    Returns:
      (outer idx [T, B] and weights [T, B] from `local.batch_plan`, inner idx
      [T, nu, B_in], Hessian idx [T, nu, B_h]); the outer plan uses the same key
      as `local_train`, so nu = 0 draws FedAvg's batches.
    """
    plan_key, step_key = jax.random.split(key)
    idx, weights = local.batch_plan(plan_key, num_examples, max_examples, batch_size=batch_size,
                                    local_steps=local_steps, local_epochs=local_epochs)
    # The k-th non-empty step draws from fold_in(., k): padding rows (which add
    # empty steps in epoch mode) do not change the batches.
    step_ids = jnp.cumsum(jnp.any(weights > 0, axis=1)) - 1
    high = jnp.maximum(num_examples, 1)
    draw = lambda i, b: jax.vmap(lambda t: jax.random.randint(
        jax.random.fold_in(jax.random.fold_in(step_key, i), t), (nu, b), 0, high))(
            step_ids).astype(jnp.int32)
    inner = draw(0, inner_batch_size)
    return idx, weights, inner, inner if shared_hessian else draw(1, hessian_batch_size)


def meta_fl(
    model: Model,
    *,
    nu: int = 1,
    mode: str = "exact",
    clients_per_round: int | None = None,
    batch_size: int = 32,
    inner_batch_size: int | None = None,
    hessian_batch_size: int | None = None,
    local_steps: int | None = 10,
    local_epochs: int | None = None,
    inner_lr: float = 0.01,
    client_lr: float = 0.001,
    outer_lr: float | None = None,
    client_optimizer: local.OptimizerSpec = "sgd",
    hessian_batches: str = "independent",
    delta: float = 1e-3,
    aggregation: str = "mean",
    remat: bool = False,
    eval_lr: float | None = None,
    eval_steps: int | None = None,
    eval_max_steps: int | None = None,
    eval_batch_size: int | None = None,
    eval_full_batch: bool = False,
    eval_seed: int = 0,
    execution: str | ex.Execution = "vmap",
) -> FederatedAlgorithm:
    """nu-step meta-FL (see the module docstring for the symbols).

    Args:
      model: the model.
      nu: inner fine-tuning steps (static, >= 0; the scan length).
      mode: "exact", "fo" or "hf" meta-gradient.
      clients_per_round: cohort size (None: all clients).
      batch_size, inner_batch_size, hessian_batch_size: D', D (default D'),
        D'' (default D').
      local_steps, local_epochs: tau steps (default 10), or epochs over D'.
      inner_lr: alpha, also the evaluation's fine-tuning step unless `eval_lr`
        is given (traced).
      client_lr: beta, the local (outer) step size (traced); `outer_lr` is
        the same argument under the paper's name.
      client_optimizer: optimizer applied to the meta-gradient (default SGD).
      hessian_batches: "independent" (Per-FedAvg's D'') or "shared" (MAML).
      delta: finite-difference step of "hf" (traced).
      aggregation: "mean" over the cohort (Per-FedAvg) or n_i-"weighted".
      remat: rematerialize inner steps in "exact" mode (memory O(nu |w|)).
      eval_lr: the evaluation's fine-tuning step size (traced; None: alpha,
        the current `inner_lr`).
      eval_steps, eval_max_steps: nu' of the scalar test statistics (default
        nu) and the curve's nu_max (default max(5, eval_steps)).
      eval_batch_size, eval_full_batch, eval_seed: fine-tuning batches of the
        evaluation (default D; full local gradient; seed).
      execution: client-axis strategy.
    """
    is_int = lambda v: isinstance(v, int) and not isinstance(v, bool)
    algorithm.check_arg("nu", nu, is_int(nu) and nu >= 0, "an int >= 0")
    algorithm.check_arg("mode", mode, mode in MODES, f"one of {MODES}")
    algorithm.check_arg("hessian_batches", hessian_batches, hessian_batches in HESSIAN_BATCHES,
                        f"one of {HESSIAN_BATCHES}")
    algorithm.check_arg("aggregation", aggregation, aggregation in AGGREGATIONS,
                        f"one of {AGGREGATIONS}")
    algorithm.check_cohort_size(clients_per_round)
    if outer_lr is not None:
        client_lr = outer_lr
    algorithm.check_number("client_lr" if outer_lr is None else "outer_lr", client_lr)
    algorithm.check_number("inner_lr", inner_lr)
    if eval_lr is not None:
        algorithm.check_number("eval_lr", eval_lr)
    algorithm.check_number("delta", delta, strict=True)
    eval_seed = algorithm.check_seed("eval_seed", eval_seed)
    inner_batch_size = batch_size if inner_batch_size is None else inner_batch_size
    hessian_batch_size = batch_size if hessian_batch_size is None else hessian_batch_size
    for name, v in (("inner_batch_size", inner_batch_size),
                    ("hessian_batch_size", hessian_batch_size)):
        algorithm.check_arg(name, v, is_int(v) and v >= 1, "an int >= 1")
    schedule = local.LocalSchedule(batch_size, local_steps, local_epochs, client_optimizer)
    eval_steps = nu if eval_steps is None else eval_steps
    eval_max_steps = max(5, eval_steps) if eval_max_steps is None else eval_max_steps
    eval_batch_size = inner_batch_size if eval_batch_size is None else eval_batch_size
    finetune.check_curve_args(eval_max_steps, eval_steps, eval_batch_size)
    execution = ex.as_execution(execution)
    loss_fn = local.model_loss_fn(model)
    objective = lambda p, b: jnp.sum(b["w"] * loss_fn(p, b["examples"], None))

    def init(key, train, params=None):
        algorithm.check_data(model, train, clients_per_round)
        # Without eval_lr the evaluation reads inner_lr itself, so a swept alpha
        # is also the fine-tuning step.
        extra = {} if eval_lr is None else {"eval_lr": eval_lr}
        hp = algorithm.hparams(client_lr=client_lr, inner_lr=inner_lr, delta=delta, **extra)
        return MetaFLState(jnp.zeros((), jnp.int32),
                           algorithm.initial_params(model, key, params), hp)

    def client_update(broadcast, x):
        params, hp = broadcast
        data, key, weight = x
        plan = meta_batches(key, data.num_examples, client_capacity(data), nu=nu,
                            batch_size=batch_size,
                            inner_batch_size=inner_batch_size,
                            hessian_batch_size=hessian_batch_size,
                            local_steps=schedule.local_steps, local_epochs=schedule.epochs,
                            shared_hessian=hessian_batches == "shared")
        optimizer = local.make_optimizer(client_optimizer, hp["client_lr"])
        gather = lambda i, w: {"examples": client_rows(data, i), "w": w}

        def step(carry, xs):
            p, opt_state = carry
            out_idx, out_w, in_idx, h_idx = xs
            uniform = lambda i: jnp.full(i.shape, 1.0 / i.shape[-1], jnp.float32)
            value, g = meta_gradient(
                objective, p, gather(in_idx, uniform(in_idx)), gather(out_idx, out_w),
                None if hessian_batches == "shared" else gather(h_idx, uniform(h_idx)),
                alpha=hp["inner_lr"], mode=mode, delta=hp["delta"], remat=remat)
            updates, new_opt_state = optimizer.update(g, opt_state, p)
            new = (optax.apply_updates(p, updates), new_opt_state)
            count = jnp.sum(out_w > 0).astype(jnp.float32)
            return optax.tree.where(count > 0, new, (p, opt_state)), (value, count)

        (tuned, _), (losses, counts) = jax.lax.scan(step, (params, optimizer.init(params)), plan)
        loss = jnp.sum(losses * counts) / jnp.maximum(jnp.sum(counts), 1.0)
        return loss, agg.weighted_delta(tuned, params, weight)

    def round_fn(state, train, key, cohort=None):
        _, data, keys, n = round_lib.start(key, train, clients_per_round, cohort)
        weights = n if aggregation == "weighted" else (n > 0).astype(jnp.float32)
        losses, (delta_sum, weight_sum) = ex.map_reduce(
            client_update, (state.params, state.hparams), (data, keys, weights), execution)
        params = jax.tree.map(jnp.add, state.params, agg.safe_div(delta_sum, weight_sum))
        metrics = {"train_loss": round_lib.mean_loss(losses, n)}
        return state.replace(round=state.round + 1, params=params), metrics

    def evaluate(state, train, test):
        return finetune.finetune_evaluate(
            model, state.params, train, test,
            state.hparams["inner_lr" if eval_lr is None else "eval_lr"], max_steps=eval_max_steps,
            report_step=eval_steps, batch_size=eval_batch_size, full_batch=eval_full_batch,
            seed=eval_seed, execution=execution)

    return FederatedAlgorithm(init, round_fn, evaluate)


def per_fedavg(model: Model, *, mode: str = "hf", **kwargs) -> FederatedAlgorithm:
    """Per-FedAvg: `meta_fl` with nu = 1; `mode` "hf" (default), "fo" or "exact"."""
    if "nu" in kwargs:
        raise ValueError(f"nu: per_fedavg fixes nu = 1, got nu={kwargs['nu']!r}; use meta_fl.")
    return meta_fl(model, nu=1, mode=mode, **kwargs)


# per_fedavg takes every meta_fl argument but nu (the CLI and the tests read it).
per_fedavg.__signature__ = inspect.signature(meta_fl).replace(parameters=[
    p.replace(default="hf") if p.name == "mode" else p
    for p in inspect.signature(meta_fl).parameters.values() if p.name != "nu"])
