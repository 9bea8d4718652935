"""Naive per-client references of FedFew, IFCA, Ditto and APFL.

Plain Python loops over the cohort (and, for FedFew, over the K models) and over
each client's local steps (plain SGD written out, `local_reference`), losses on
the UNPADDED rows, and weights and aggregation written out in float64 NumPy.
"""

from __future__ import annotations

import jax
import numpy as np

from fedjax_pfl.testing.common import Clients, cohort, f64, stack, stacked_row
from fedjax_pfl.testing.local_reference import (
    Schedule,
    as_numpy,
    check_sgd,
    loss_and_grad,
    minibatches,
    server_sgd,
    sq_dist_grad,
    train_model,
    tree_axpy,
    tree_scale,
)
from fedjax_pfl.testing.local_reference import mean_loss as _rows_mean_loss

_COMMON = {"clients_per_round": None, "batch_size": 32, "local_steps": None,
           "local_epochs": None, "client_optimizer": "sgd", "server_optimizer": "sgd"}


def _lse(a, axis=None):
    m = np.max(a, axis=axis, keepdims=True)
    return np.squeeze(m + np.log(np.sum(np.exp(a - m), axis=axis, keepdims=True)), axis=axis)


def stch_weights_reference(losses, num_examples, mu):
    """FedFew's weights transcribed from the released code (float64, log space).

    Returns:
      (w [S, K], alpha [S]); clients with no examples get alpha 0.
    """
    losses = np.asarray(losses, np.float64)
    n = np.asarray(num_examples, np.float64)
    x = losses * (n / max(n.sum(), 1.0))[:, None]
    logits = -x / mu
    log_s = _lse(logits, axis=1)
    w = np.exp(logits - log_s[:, None])
    valid = n > 0
    alpha = np.zeros_like(n)
    alpha[valid] = np.exp(-log_s[valid] - _lse(-log_s[valid]))
    return w, alpha


def _mean_loss(model, params, row) -> float:
    """Mean loss of `params` on a client row's valid rows (0 when it has none)."""
    examples = {k: np.asarray(v) for k, v in row.examples.items()}
    return _rows_mean_loss(model, params, examples, int(row.num_examples))


def _schedule(cfg) -> Schedule:
    return Schedule.of(cfg["batch_size"], cfg["local_steps"], cfg["local_epochs"])


def _stack64(trees):
    return jax.tree.map(lambda *r: np.stack(r), *trees)


def _weighted_mean_delta(pairs, weights):
    """sum_i w_i (c_i - s) / sum_i w_i over (client, server) pairs (zeros if no weight), f64."""
    total = jax.tree.map(lambda s: np.zeros(np.shape(s)), pairs[0][1])
    for (c, s), w in zip(pairs, weights):
        total = jax.tree.map(lambda t, a, b, w=w: t + w * (a - b), total, f64(c), f64(s))
    weight_sum = float(sum(weights))
    return jax.tree.map(lambda t: t / weight_sum if weight_sum > 0 else 0 * t, total)


def _naive_fedfew(model, state, train, key, cfg):
    check_sgd(cfg)
    ids, client_key = cohort(train, key, cfg["clients_per_round"])
    clients = Clients(train)
    hp = {k: float(v) for k, v in state.hparams.items()}
    num_models, schedule = cfg["num_models"], _schedule(cfg)
    servers = [stacked_row(state.params, k) for k in range(num_models)]
    losses = np.zeros((len(ids), num_models))
    deltas = []
    for s, i in enumerate(ids):
        examples, n, key_i = clients.examples(i), clients.n[i], jax.random.fold_in(client_key, i)
        deltas.append([])
        for k in range(num_models):
            # every copy its own minibatch order (or all the client's order)
            key_ik = jax.random.fold_in(key_i, k) if cfg["per_model_orders"] else key_i
            run = train_model(model, servers[k], examples, n, key_ik, schedule, hp["client_lr"])
            if cfg["loss_at"] == "received":
                losses[s, k] = _rows_mean_loss(model, servers[k], examples, n)
            else:  # the mean minibatch loss of the last epoch (all steps in step mode)
                steps = len(run.losses)
                last = steps if schedule.epochs is None else steps // schedule.epochs
                losses[s, k] = run.mean_loss(last)
            deltas[-1].append(jax.tree.map(np.subtract, f64(run.params), f64(servers[k])))
    n = np.asarray([clients.n[i] for i in ids], np.float64)
    w, alpha = stch_weights_reference(losses, n, hp["mu"])
    mean = []
    for k in range(num_models):  # theta_k + sum_i alpha_i w_ik (theta_ik - theta_k)
        terms = [jax.tree.map(lambda d, c=alpha[s] * w[s, k]: c * d, deltas[s][k])
                 for s in range(len(ids))]
        mean.append(jax.tree.map(lambda *t: np.sum(t, axis=0), *terms))
    new = state.replace(round=state.round + 1,
                        params=server_sgd(cfg, state.hparams, state.params, _stack64(mean)),
                        last_params=state.params, last_key=jax.random.key_data(key),
                        last_cohort=np.isin(np.arange(train.num_clients), ids))
    return new, {"train_loss": float((n * losses.min(1)).sum() / max(n.sum(), 1.0))}


def _naive_ifca(model, state, train, key, cfg):
    check_sgd(cfg)
    ids, client_key = cohort(train, key, cfg["clients_per_round"])
    clients = Clients(train)
    hp = {k: float(v) for k, v in state.hparams.items()}
    num_models = cfg["num_models"]
    servers = [stacked_row(state.params, k) for k in range(num_models)]
    chosen = [[] for _ in range(num_models)]  # (client model, weight n_i) per model
    loss_num, n_sum = 0.0, 0.0
    for i in ids:
        examples, n = clients.examples(i), clients.n[i]
        # the received model of lowest training loss (ties: the lowest index)
        choice = int(np.argmin([_rows_mean_loss(model, p, examples, n) for p in servers]))
        run = train_model(model, servers[choice], examples, n,
                          jax.random.fold_in(client_key, i), _schedule(cfg), hp["client_lr"])
        chosen[choice].append((run.params, float(n)))
        loss_num += n * run.mean_loss()
        n_sum += n
    mean = [_weighted_mean_delta([(c, servers[k]) for c, _ in chosen[k]],
                                 [w for _, w in chosen[k]]) if chosen[k]
            else jax.tree.map(lambda a: np.zeros(np.shape(a)), servers[k])
            for k in range(num_models)]
    new = state.replace(round=state.round + 1,
                        params=server_sgd(cfg, state.hparams, state.params, _stack64(mean)))
    return new, {"train_loss": loss_num / max(n_sum, 1.0)}


def _naive_ditto(model, state, train, key, cfg):
    check_sgd(cfg)
    ids, client_key = cohort(train, key, cfg["clients_per_round"])
    clients = Clients(train)
    hp = {k: float(v) for k, v in state.hparams.items()}
    server = as_numpy(state.params)
    personal = [stacked_row(state.client_params, i) for i in range(train.num_clients)]
    personal_schedule = _schedule(cfg)
    if cfg["personal_steps"] is not None or cfg["personal_epochs"] is not None:
        personal_schedule = Schedule.of(cfg["batch_size"], cfg["personal_steps"],
                                        cfg["personal_epochs"])
    pairs, weights, loss_num = [], [], 0.0
    for i in ids:
        examples, n, key_i = clients.examples(i), clients.n[i], jax.random.fold_in(client_key, i)
        # (1) the global copy, exactly FedAvg's client
        run = train_model(model, server, examples, n, key_i, _schedule(cfg), hp["client_lr"])
        # (2) the personal model on f_i(v) + lam/2 ||v - w||^2, its own minibatch order
        # and its own schedule (s steps or epochs; by default the global copy's)
        personal[i] = train_model(model, personal[i], examples, n, jax.random.fold_in(key_i, 1),
                                  personal_schedule, hp["personal_lr"],
                                  lambda v: sq_dist_grad(hp["lam"], v, server)).params
        pairs.append((run.params, server))
        weights.append(float(n))
        loss_num += n * run.mean_loss()
    mean = _weighted_mean_delta(pairs, weights)
    new = state.replace(round=state.round + 1,
                        params=server_sgd(cfg, state.hparams, state.params, mean),
                        client_params=stack(personal))
    return new, {"train_loss": loss_num / max(sum(weights), 1.0)}


def _mix(a, v, w):
    """a v + (1 - a) w, leaf by leaf (float32)."""
    return jax.tree.map(lambda vi, wi: np.float32(a) * vi + np.float32(1 - a) * wi, v, w)


def _naive_apfl(model, state, train, key, cfg):
    check_sgd(cfg)
    ids, client_key = cohort(train, key, cfg["clients_per_round"])
    clients = Clients(train)
    hp = {k: float(v) for k, v in state.hparams.items()}
    server = as_numpy(state.params)
    personal = [stacked_row(state.client_params, i) for i in range(train.num_clients)]
    alphas = np.asarray(state.client_alpha, np.float32).copy()
    schedule, lr = _schedule(cfg), hp["client_lr"]
    pairs, weights, loss_num = [], [], 0.0
    for i in ids:
        examples, n = clients.examples(i), clients.n[i]
        plan_key, step_key = jax.random.split(jax.random.fold_in(client_key, i))
        steps = minibatches(plan_key, n, clients.max_examples, schedule)
        step_keys = jax.random.split(step_key, len(steps))
        w, v, a = server, personal[i], float(alphas[i])
        num, den = 0.0, 0
        for rows, k in zip(steps, step_keys):
            if len(rows) == 0:
                continue
            # all three gradients at the step's starting point, on the same minibatch
            loss_w, g_w = loss_and_grad(model, w, examples, rows, k)
            mixed = _mix(a, v, w)
            _, g_mix = loss_and_grad(model, mixed, examples, rows, k)
            g_a = sum(float(np.sum((np.asarray(vi, np.float64) - wi) * g))
                      for vi, wi, g in zip(jax.tree.leaves(v), jax.tree.leaves(w),
                                           jax.tree.leaves(g_mix)))
            w = tree_axpy(-lr, g_w, w)
            v = tree_axpy(-lr, tree_scale(a, g_mix), v)
            a = float(np.clip(a - hp["alpha_lr"] * g_a, 0.0, 1.0))
            num, den = num + len(rows) * loss_w, den + len(rows)
        personal[i], alphas[i] = v, a
        pairs.append((w, server))
        weights.append(float(n))
        loss_num += n * (num / den if den else 0.0)
    mean = _weighted_mean_delta(pairs, weights)
    new = state.replace(round=state.round + 1,
                        params=server_sgd(cfg, state.hparams, state.params, mean),
                        client_params=stack(personal), client_alpha=alphas)
    return new, {"train_loss": loss_num / max(sum(weights), 1.0)}


NAIVE_ROUNDS = {
    "fedfew": _naive_fedfew,
    "ifca": _naive_ifca,
    "ditto": _naive_ditto,
    "apfl": _naive_apfl,
}

DEFAULTS = {
    "fedfew": {**_COMMON, "num_models": 3, "loss_at": "last_epoch", "per_model_orders": True},
    "ifca": {**_COMMON, "num_models": 3},
    "ditto": {**_COMMON, "personal_steps": None, "personal_epochs": None},
    "apfl": _COMMON,
}
