"""Naive per-client references of nu-step meta-FL, Per-FedAvg and pFedMe.

Each client is trained alone (jitted, no vmap) with plain Python loops over the
local steps and the nu inner steps (unrolled at trace time, no `lax.scan`); the
exact meta-gradient is the explicit backward recursion of Hessian-vector
products (`jax.jvp` of the gradient), not autodiff through the unroll. The
server average is written out in float64 NumPy. Minibatch indices come from
`meta_fl.meta_batches` / `local.batch_plan` (the randomness contract).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from fedjax_pfl.algorithms.meta_fl import meta_batches
from fedjax_pfl.core import local
from fedjax_pfl.testing.common import client_row, cohort, f64


def _axpy(a, x, y):
    """y + a x over pytrees."""
    return jax.tree.map(lambda xi, yi: yi + a * xi, x, y)


def _where(cond, new, old):
    return jax.tree.map(lambda a, b: jnp.where(cond, a, b), new, old)


def _accumulate(total, weight, client, server):
    """total + weight (client - server), float64."""
    return jax.tree.map(lambda t, c, s: t + weight * (c - s), total, client, server)


@functools.lru_cache(maxsize=32)
def _meta_trainer(model, cfg_items):
    cfg = dict(cfg_items)
    loss_fn = local.model_loss_fn(model)
    nu, mode, shared = cfg["nu"], cfg["mode"], cfg["hessian_batches"] == "shared"
    b_in = cfg["inner_batch_size"] or cfg["batch_size"]
    b_h = cfg["hessian_batch_size"] or cfg["batch_size"]
    schedule = local.LocalSchedule(cfg["batch_size"], cfg["local_steps"], cfg["local_epochs"])

    def train(params, row, key, beta, alpha, delta):
        rows = row.examples["x"].shape[0]
        out_idx, out_w, in_idx, h_idx = meta_batches(
            key, row.num_examples, rows, nu=nu, batch_size=cfg["batch_size"],
            inner_batch_size=b_in, hessian_batch_size=b_h, local_steps=schedule.local_steps,
            local_epochs=schedule.epochs, shared_hessian=shared)
        optimizer = local.make_optimizer(cfg["client_optimizer"], beta)
        opt_state = optimizer.init(params)

        def loss(p, idx, w):
            batch = jax.tree.map(lambda a: a[idx], row.examples)
            return jnp.sum(w * loss_fn(p, batch, None))

        grad = jax.grad(loss)
        losses, counts = [], []
        for t in range(out_idx.shape[0]):
            mean_in = jnp.full((b_in,), 1.0 / b_in)
            mean_h = jnp.full((b_h,), 1.0 / b_h)
            iterates = [params]
            for j in range(nu):
                iterates.append(_axpy(-alpha, grad(iterates[-1], in_idx[t, j], mean_in),
                                      iterates[-1]))
            value = loss(iterates[-1], out_idx[t], out_w[t])
            v = grad(iterates[-1], out_idx[t], out_w[t])
            if mode != "fo":
                for j in reversed(range(nu)):
                    hess_idx = in_idx[t, j] if shared else h_idx[t, j]
                    hess_w = mean_in if shared else mean_h
                    g = lambda p, i=hess_idx, w=hess_w: grad(p, i, w)
                    if mode == "exact":
                        hv = jax.jvp(g, (iterates[j],), (v,))[1]
                    else:
                        hv = jax.tree.map(lambda a, b: (a - b) / (2 * delta),
                                          g(_axpy(delta, v, iterates[j])),
                                          g(_axpy(-delta, v, iterates[j])))
                    v = _axpy(-alpha, hv, v)
            updates, new_state = optimizer.update(v, opt_state, params)
            count = jnp.sum(out_w[t] > 0)
            params = _where(count > 0, jax.tree.map(jnp.add, params, updates), params)
            opt_state = _where(count > 0, new_state, opt_state)
            losses.append(value)
            counts.append(count.astype(jnp.float32))
        losses, counts = jnp.stack(losses), jnp.stack(counts)
        return params, jnp.sum(losses * counts) / jnp.maximum(jnp.sum(counts), 1.0)

    return jax.jit(train)


def _naive_meta_fl(model, state, train, key, cfg):
    ids, client_key = cohort(train, key, cfg["clients_per_round"])
    hp = {k: float(v) for k, v in state.hparams.items()}
    keys = ("nu", "mode", "hessian_batches", "inner_batch_size", "hessian_batch_size",
            "batch_size", "local_steps", "local_epochs", "client_optimizer")
    trainer = _meta_trainer(model, tuple((k, cfg[k]) for k in keys))
    server = f64(state.params)
    total = jax.tree.map(np.zeros_like, server)
    weight_sum, loss_num, n_sum = 0.0, 0.0, 0.0
    for i in ids:
        params, loss = trainer(state.params, client_row(train, i),
                               jax.random.fold_in(client_key, i), hp["client_lr"],
                               hp["inner_lr"], hp["delta"])
        n = float(train.num_examples[i])
        w = n if cfg["aggregation"] == "weighted" else float(n > 0)
        total = _accumulate(total, w, f64(params), server)
        weight_sum += w
        loss_num += n * float(loss)
        n_sum += n
    params = jax.tree.map(lambda s, t: jnp.asarray(s + (t / weight_sum if weight_sum else 0 * t),
                                                   jnp.float32), server, total)
    new = state.replace(round=state.round + 1, params=params)
    return new, {"train_loss": loss_num / max(n_sum, 1.0)}


def _naive_per_fedavg(model, state, train, key, cfg):
    return _naive_meta_fl(model, state, train, key, {**cfg, "nu": 1})


@functools.lru_cache(maxsize=32)
def _pfedme_trainer(model, batch_size, local_steps, local_epochs, inner_steps):
    loss_fn = local.model_loss_fn(model)
    schedule = local.LocalSchedule(batch_size, local_steps, local_epochs)

    def train(params, personal, row, key, hp):
        rows = row.examples["x"].shape[0]
        idx, weights = local.batch_plan(key, row.num_examples, rows, batch_size=batch_size,
                                        local_steps=schedule.local_steps,
                                        local_epochs=schedule.epochs)
        w_local, theta, losses, counts = params, params, [], []
        for t in range(idx.shape[0]):
            batch = jax.tree.map(lambda a, i=idx[t]: a[i], row.examples)
            data_loss = lambda p, b=batch, w=weights[t]: jnp.sum(w * loss_fn(p, b, None))
            th = theta
            for _ in range(inner_steps):
                g = jax.grad(data_loss)(th)
                prox = jax.tree.map(lambda a, b: hp["lam"] * (a - b), th, w_local)
                th = _axpy(-hp["personal_lr"], jax.tree.map(jnp.add, g, prox), th)
            wl = _axpy(-hp["client_lr"] * hp["lam"], jax.tree.map(jnp.subtract, w_local, th),
                       w_local)
            count = jnp.sum(weights[t] > 0)
            w_local, theta = _where(count > 0, wl, w_local), _where(count > 0, th, theta)
            losses.append(data_loss(th))
            counts.append(count.astype(jnp.float32))
        losses, counts = jnp.stack(losses), jnp.stack(counts)
        stepped = jnp.sum(counts) > 0
        theta = jax.tree.map(lambda a, b: jnp.where(stepped, a, b), theta, personal)
        return w_local, theta, jnp.sum(losses * counts) / jnp.maximum(jnp.sum(counts), 1.0)

    return jax.jit(train)


def _naive_pfedme(model, state, train, key, cfg):
    ids, client_key = cohort(train, key, cfg["clients_per_round"])
    trainer = _pfedme_trainer(model, cfg["batch_size"], cfg["local_steps"], cfg["local_epochs"],
                              cfg["inner_steps"])
    server = f64(state.params)
    total = jax.tree.map(np.zeros_like, server)
    rows = [f64(client_row(state.client_params, i)) for i in range(train.num_clients)]
    weight_sum, loss_num, n_sum = 0.0, 0.0, 0.0
    for i in ids:
        w_local, theta, loss = trainer(state.params, client_row(state.client_params, i),
                                       client_row(train, i), jax.random.fold_in(client_key, i),
                                       state.hparams)
        rows[i] = f64(theta)
        n = float(train.num_examples[i])
        w = n if cfg["weighting"] == "num_examples" else float(n > 0)
        total = _accumulate(total, w, f64(w_local), server)
        weight_sum += w
        loss_num += n * float(loss)
        n_sum += n
    beta = float(state.hparams["beta"])
    params = jax.tree.map(lambda s, t: jnp.asarray(
        s + beta * (t / weight_sum if weight_sum else 0 * t), jnp.float32), server, total)
    stacked = jax.tree.map(lambda *r: jnp.asarray(np.stack(r), jnp.float32), *rows)
    new = state.replace(round=state.round + 1, params=params, client_params=stacked)
    return new, {"train_loss": loss_num / max(n_sum, 1.0)}


NAIVE_ROUNDS = {
    "meta_fl": _naive_meta_fl,
    "per_fedavg": _naive_per_fedavg,
    "pfedme": _naive_pfedme,
}
