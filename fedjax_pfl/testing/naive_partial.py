"""Naive per-client references of FedAlt, FedSim, FedRep, FedPer and FedAPM.

A Python loop over the cohort; each phase of each client is jitted alone (no
vmap) with its penalties written out leaf by leaf; duals, drift and the server
averages are computed in float64 NumPy.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from fedjax_pfl.core import local
from fedjax_pfl.core.partial import model_partition
from fedjax_pfl.testing.common import client_row, cohort, f64


def _sum_sq(a, b=None):
    pairs = zip(jax.tree.leaves(a), jax.tree.leaves(b) if b is not None else [None] * 999)
    return sum(jnp.sum((x - (0.0 if y is None else y)) ** 2) for x, y in pairs)


@functools.lru_cache(maxsize=64)
def _trainer(model, personal, phase, batch_size, local_steps, local_epochs, optimizer):
    """ONE client's `phase` ("personal", "shared" or "joint"), jitted alone."""
    part = model_partition(model, personal)
    schedule = local.LocalSchedule(batch_size, local_steps, local_epochs, optimizer)
    loss_fn = local.model_loss_fn(model)

    def train(block, other, row, key, lr, scale, wd, prox, anchor, dual):
        if phase == "personal":
            merge = lambda p: part.merge(p, other)
            penalty = lambda p: scale * wd / 2 * _sum_sq(p) + prox / 2 * _sum_sq(p, anchor)
        elif phase == "shared":
            merge = lambda p: part.merge(other, p)
            penalty = lambda p: (scale * wd / 2 * _sum_sq(p) + prox / 2 * _sum_sq(p, anchor)
                                 + sum(jnp.sum(d * (x - a)) for d, x, a in zip(
                                     jax.tree.leaves(dual), jax.tree.leaves(p),
                                     jax.tree.leaves(anchor))))
        else:
            merge = lambda p: part.merge(*p)
            penalty = None
        fn = lambda p, batch, k: scale * loss_fn(merge(p), batch, k)
        return schedule.train(fn, block, row, key, lr, penalty)

    return jax.jit(train)


def _phase(model, cfg, phase, steps, epochs, *args):
    personal = cfg["personal"] if "personal" in cfg else cfg["head"]
    trainer = _trainer(model, personal, phase, cfg["batch_size"], steps, epochs,
                       cfg["client_optimizer"])
    return trainer(*args)


def _zeros(tree):
    return jax.tree.map(jnp.zeros_like, tree)


def _drift(u_i, u):
    return sum(float(np.sqrt(np.sum((a - b) ** 2)))
               for a, b in zip(jax.tree.leaves(f64(u_i)), jax.tree.leaves(f64(u))))


def _mean(trees, weights):
    total = float(sum(weights))
    return jax.tree.map(lambda *xs: sum(w * x for w, x in zip(weights, xs)) / total, *trees)


def _naive_partial(model, state, train, key, cfg, mode):
    ids, client_key = cohort(train, key, cfg["clients_per_round"])
    lr = float(state.hparams["client_lr"])
    u = state.shared
    steps, epochs = cfg["local_steps"], cfg["local_epochs"]
    p_steps, p_epochs = cfg.get("personal_steps"), cfg.get("personal_epochs")
    if p_steps is None and p_epochs is None:
        p_steps, p_epochs = steps, epochs
    rows = [client_row(state.client_personal, i) for i in range(train.num_clients)]
    shared_rows, weights, loss_num, n_sum, drifts = [], [], 0.0, 0.0, []
    for i in ids:
        data, k = client_row(train, i), jax.random.fold_in(client_key, i)
        zero = (0.0, 0.0, _zeros(u), _zeros(u))  # wd, prox, anchor, dual
        if mode == "alternating":
            v = _phase(model, cfg, "personal", p_steps, p_epochs, rows[i], u, data,
                       jax.random.fold_in(k, 0), lr, 1.0, 0.0, 0.0, rows[i], rows[i]).params
            r = _phase(model, cfg, "shared", steps, epochs, u, v, data,
                       jax.random.fold_in(k, 1), lr, 1.0, *zero)
            u_i = r.params
        else:
            r = _phase(model, cfg, "joint", steps, epochs, (rows[i], u), None, data,
                       jax.random.fold_in(k, 1), lr, 1.0, *zero)
            v, u_i = r.params
        rows[i] = v
        n = float(train.num_examples[i])
        shared_rows.append(f64(u_i))
        weights.append(n if cfg["weighting"] == "num_examples" else float(n > 0))
        loss_num, n_sum = loss_num + n * float(r.mean_loss()), n_sum + n
        if n > 0:
            drifts.append(_drift(u_i, u))
    if sum(weights) > 0:
        u = jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), _mean(shared_rows, weights))
    stacked = jax.tree.map(lambda *r: jnp.stack(r), *rows)
    new = state.replace(round=state.round + 1, shared=u, client_personal=stacked)
    return new, {"train_loss": loss_num / max(n_sum, 1.0),
                 "drift": float(np.mean(drifts)) if drifts else 0.0}


def _naive_fedapm(model, state, train, key, cfg):
    ids, client_key = cohort(train, key, cfg["clients_per_round"])
    hp = {k: float(v) for k, v in state.hparams.items()}
    steps, epochs = cfg["local_steps"], cfg["local_epochs"]
    if steps is not None:
        epochs = None
    has = np.asarray(train.num_examples) > 0
    alpha = 1.0 / max(int(has.sum()), 1) if cfg["client_weight"] == "uniform" else 1.0
    u = state.shared
    m = train.num_clients
    v_rows = [client_row(state.client_personal, i) for i in range(m)]
    u_rows = [f64(client_row(state.client_shared, i)) for i in range(m)]
    d_rows = [f64(client_row(state.client_dual, i)) for i in range(m)]
    loss_num, n_sum, drifts = 0.0, 0.0, []
    for i in ids:
        data, k = client_row(train, i), jax.random.fold_in(client_key, i)
        v = _phase(model, cfg, "personal", steps, epochs, v_rows[i], u, data,
                   jax.random.fold_in(k, 0), hp["client_lr"], alpha, hp["weight_decay"],
                   hp["sigma"], v_rows[i], v_rows[i]).params
        dual = client_row(state.client_dual, i)
        r = _phase(model, cfg, "shared", steps, epochs, u, v, data, jax.random.fold_in(k, 1),
                   hp["client_lr"], alpha, hp["weight_decay"], hp["rho"], u, dual)
        v_rows[i] = v
        u_rows[i] = f64(r.params)
        d_rows[i] = jax.tree.map(lambda p, a, b: p + hp["rho"] * (a - b), d_rows[i], u_rows[i],
                                 f64(u))
        n = float(train.num_examples[i])
        loss_num, n_sum = loss_num + n * float(r.mean_loss()) / alpha, n_sum + n
        if n > 0:
            drifts.append(_drift(r.params, u))
    members = np.flatnonzero(has) if cfg["server_average"] == "all" else [i for i in ids if has[i]]
    if len(members):
        z = [jax.tree.map(lambda a, p: a + (p / hp["rho"] if hp["rho"] > 0 else 0.0),
                          u_rows[i], d_rows[i]) for i in members]
        u = jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), _mean(z, [1.0] * len(z)))
    to32 = lambda rows: jax.tree.map(lambda *r: jnp.asarray(np.stack(r), jnp.float32), *rows)
    new = state.replace(round=state.round + 1, shared=u,
                        client_personal=jax.tree.map(lambda *r: jnp.stack(r), *v_rows),
                        client_shared=to32(u_rows), client_dual=to32(d_rows))
    return new, {"train_loss": loss_num / max(n_sum, 1.0),
                 "drift": float(np.mean(drifts)) if drifts else 0.0}


NAIVE_ROUNDS = {
    "fedalt": functools.partial(_naive_partial, mode="alternating"),
    "fedrep": functools.partial(_naive_partial, mode="alternating"),
    "fedsim": functools.partial(_naive_partial, mode="simultaneous"),
    "fedper": functools.partial(_naive_partial, mode="simultaneous"),
    "fedapm": _naive_fedapm,
}
