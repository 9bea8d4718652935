"""Naive per-client references of FedFew, IFCA, Ditto and APFL.

Plain Python loops over the cohort (and, for FedFew, over the K models), each
client's training jitted alone, losses on the UNPADDED rows, and weights and
aggregation written out in float64 NumPy.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax

from fedjax_pfl.core import local
from fedjax_pfl.testing.common import client_row, cohort, f64, train_one


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
    """Mean loss of `params` on the client's valid rows (0 when it has none)."""
    n = int(row.num_examples)
    if n == 0:
        return 0.0
    batch = jax.tree.map(lambda a: a[:n], row.examples)
    return float(np.mean(np.asarray(model.loss(model.apply(params, batch, None), batch),
                                    np.float64)))


def _server_step(cfg, hp, state, mean_delta):
    opt = local.make_optimizer(cfg["server_optimizer"], hp["server_lr"])
    updates, opt_state = opt.update(jax.tree.map(lambda d: -jnp.asarray(d, jnp.float32),
                                                 mean_delta), state.opt_state, state.params)
    return optax.apply_updates(state.params, updates), opt_state


def _stack(rows):
    return jax.tree.map(lambda *r: np.stack(r), *rows)


def _naive_fedfew(model, state, train, key, cfg):
    ids, client_key = cohort(train, key, cfg["clients_per_round"])
    hp = {k: float(v) for k, v in state.hparams.items()}
    num_models = cfg["num_models"]
    servers = [client_row(state.params, k) for k in range(num_models)]
    losses = np.zeros((len(ids), num_models))
    deltas = []
    for s, i in enumerate(ids):
        row, key_i = client_row(train, i), jax.random.fold_in(client_key, i)
        deltas.append([])
        for k in range(num_models):
            key_ik = jax.random.fold_in(key_i, k) if cfg["per_model_orders"] else key_i
            result = train_one(model, cfg, servers[k], row, key_ik, hp["client_lr"])
            if cfg["loss_at"] == "received":
                losses[s, k] = _mean_loss(model, servers[k], row)
            else:
                steps = len(result.losses)
                epochs = cfg["local_epochs"] or 1
                last = steps if cfg["local_steps"] is not None else steps // epochs
                l_, c_ = (np.asarray(a, np.float64)[-last:] for a in (result.losses, result.counts))
                losses[s, k] = (l_ * c_).sum() / max(c_.sum(), 1.0)
            deltas[-1].append(jax.tree.map(np.subtract, f64(result.params), f64(servers[k])))
    n = np.asarray(train.num_examples, np.float64)[ids]
    w, alpha = stch_weights_reference(losses, n, hp["mu"])
    mean = []
    for k in range(num_models):
        terms = [jax.tree.map(lambda d, c=alpha[s] * w[s, k]: c * d, deltas[s][k])
                 for s in range(len(ids))]
        mean.append(jax.tree.map(lambda *t: np.sum(t, axis=0), *terms))
    params, opt_state = _server_step(cfg, hp, state, _stack(mean))
    new = state.replace(round=state.round + 1, params=params, opt_state=opt_state,
                        last_params=state.params, last_key=jax.random.key_data(key),
                        last_cohort=np.isin(np.arange(train.num_clients), ids))
    return new, {"train_loss": float((n * losses.min(1)).sum() / max(n.sum(), 1.0))}


def _naive_ifca(model, state, train, key, cfg):
    ids, client_key = cohort(train, key, cfg["clients_per_round"])
    hp = {k: float(v) for k, v in state.hparams.items()}
    num_models = cfg["num_models"]
    servers = [client_row(state.params, k) for k in range(num_models)]
    totals = [None] * num_models
    weights = np.zeros(num_models)
    loss_num, n_sum = 0.0, 0.0
    for i in ids:
        row = client_row(train, i)
        choice = int(np.argmin([_mean_loss(model, p, row) for p in servers]))
        result = train_one(model, cfg, servers[choice], row, jax.random.fold_in(client_key, i),
                           hp["client_lr"])
        n = float(train.num_examples[i])
        delta = jax.tree.map(lambda c, s, n=n: n * (c - s), f64(result.params),
                             f64(servers[choice]))
        totals[choice] = delta if totals[choice] is None else jax.tree.map(
            np.add, totals[choice], delta)
        weights[choice] += n
        loss_num += n * float(result.mean_loss())
        n_sum += n
    zero = jax.tree.map(lambda a: np.zeros(a.shape), servers[0])
    mean = [jax.tree.map(lambda t, k=k: t / weights[k], totals[k]) if weights[k] > 0 else zero
            for k in range(num_models)]
    params, opt_state = _server_step(cfg, hp, state, _stack(mean))
    new = state.replace(round=state.round + 1, params=params, opt_state=opt_state)
    return new, {"train_loss": loss_num / max(n_sum, 1.0)}


def _naive_ditto(model, state, train, key, cfg):
    ids, client_key = cohort(train, key, cfg["clients_per_round"])
    hp = {k: float(v) for k, v in state.hparams.items()}
    server = state.params
    personal = [f64(client_row(state.client_params, i)) for i in range(train.num_clients)]
    total, weight_sum, loss_num = None, 0.0, 0.0
    for i in ids:
        row, key_i = client_row(train, i), jax.random.fold_in(client_key, i)
        result = train_one(model, cfg, server, row, key_i, hp["client_lr"])
        own = client_row(state.client_params, i)
        personal[i] = f64(train_one(model, cfg, own, row, jax.random.fold_in(key_i, 1),
                                    hp["personal_lr"], hp["lam"], server).params)
        n = float(train.num_examples[i])
        delta = jax.tree.map(lambda c, s, n=n: n * (c - s), f64(result.params), f64(server))
        total = delta if total is None else jax.tree.map(np.add, total, delta)
        weight_sum += n
        loss_num += n * float(result.mean_loss())
    mean = jax.tree.map(lambda d: d / weight_sum if weight_sum > 0 else 0 * d, total)
    params, opt_state = _server_step(cfg, hp, state, mean)
    stacked = jax.tree.map(lambda r: jnp.asarray(r, jnp.float32), _stack(personal))
    new = state.replace(round=state.round + 1, params=params, opt_state=opt_state,
                        client_params=stacked)
    return new, {"train_loss": loss_num / max(weight_sum, 1.0)}


@functools.lru_cache(maxsize=16)
def _apfl_step(model):
    """One APFL step of ONE client with explicit gradients (plain SGD), jitted alone."""

    def loss(p, batch, weights, key):
        return jnp.sum(weights * model.loss(model.apply(p, batch, key), batch))

    def step(w, v, a, batch, weights, key, lr, alpha_lr):
        data_loss, g_w = jax.value_and_grad(loss)(w, batch, weights, key)
        mixed = jax.tree.map(lambda vi, wi: a * vi + (1 - a) * wi, v, w)
        g_mix = jax.grad(loss)(mixed, batch, weights, key)
        g_a = sum(jnp.sum((vi - wi) * g) for vi, wi, g in zip(
            jax.tree.leaves(v), jax.tree.leaves(w), jax.tree.leaves(g_mix)))
        new_w = jax.tree.map(lambda p, g: p - lr * g, w, g_w)
        new_v = jax.tree.map(lambda p, g: p - lr * a * g, v, g_mix)
        return new_w, new_v, jnp.clip(a - alpha_lr * g_a, 0.0, 1.0), data_loss

    return jax.jit(step)


def _naive_apfl(model, state, train, key, cfg):
    if cfg["client_optimizer"] != "sgd":
        raise ValueError("client_optimizer: the naive APFL reference supports only 'sgd'.")
    ids, client_key = cohort(train, key, cfg["clients_per_round"])
    hp = {k: float(v) for k, v in state.hparams.items()}
    server = state.params
    personal = [client_row(state.client_params, i) for i in range(train.num_clients)]
    alphas = np.asarray(state.client_alpha, np.float32).copy()
    step = _apfl_step(model)
    total, weight_sum, loss_num = None, 0.0, 0.0
    for i in ids:
        row = client_row(train, i)
        plan_key, step_key = jax.random.split(jax.random.fold_in(client_key, i))
        idx, bw = local.batch_plan(plan_key, row.num_examples, train.max_examples,
                                   batch_size=cfg["batch_size"], local_steps=cfg["local_steps"],
                                   local_epochs=None if cfg["local_steps"] is not None
                                   else (cfg["local_epochs"] or 1))
        keys = jax.random.split(step_key, idx.shape[0])
        w, v, a = server, personal[i], jnp.float32(alphas[i])
        num, den = 0.0, 0.0
        for t in range(idx.shape[0]):
            count = float(np.sum(np.asarray(bw[t]) > 0))
            if count == 0:
                continue
            batch = jax.tree.map(lambda x, rows=idx[t]: x[rows], row.examples)
            w, v, a, data_loss = step(w, v, a, batch, bw[t], keys[t], hp["client_lr"],
                                      hp["alpha_lr"])
            num, den = num + count * float(data_loss), den + count
        personal[i], alphas[i] = v, float(a)
        n = float(train.num_examples[i])
        delta = jax.tree.map(lambda c, s, n=n: n * (c - s), f64(w), f64(server))
        total = delta if total is None else jax.tree.map(np.add, total, delta)
        weight_sum += n
        loss_num += n * num / max(den, 1.0)
    mean = jax.tree.map(lambda d: d / weight_sum if weight_sum > 0 else 0 * d, total)
    params, opt_state = _server_step(cfg, hp, state, mean)
    new = state.replace(round=state.round + 1, params=params, opt_state=opt_state,
                        client_params=_stack(personal), client_alpha=jnp.asarray(alphas))
    return new, {"train_loss": loss_num / max(weight_sum, 1.0)}


NAIVE_ROUNDS = {
    "fedfew": _naive_fedfew,
    "ifca": _naive_ifca,
    "ditto": _naive_ditto,
    "apfl": _naive_apfl,
}
