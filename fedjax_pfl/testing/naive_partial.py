"""Naive per-client references of FedAlt, FedSim, FedRep, FedPer and FedAPM.

The model's params are split into a personal block v (per client) and a shared
block u by their "/"-joined leaf paths (`local_reference.Blocks`: top-level
module names, a regex or a predicate). A Python loop over the cohort runs each
phase as plain SGD over the phase's minibatches: the gradient of the data loss of
the merged params, restricted to the trained block, plus the penalties'
gradients in closed form. Duals, drift and the server averages are float64 NumPy.

Keys: client i's personal phase uses `fold_in(key_i, 0)`, its shared (or joint)
phase `fold_in(key_i, 1)`.
"""

from __future__ import annotations

import functools

import jax
import numpy as np

from fedjax_pfl.testing.common import Clients, cohort, f64, stack, stacked_row
from fedjax_pfl.testing.local_reference import (
    Blocks,
    Schedule,
    as_numpy,
    check_sgd,
    loss_and_grad,
    sgd,
    sq_dist_grad,
    tree_add,
    tree_scale,
)

_PARTIAL = {"clients_per_round": None, "batch_size": 32, "local_steps": None,
            "local_epochs": None, "client_optimizer": "sgd", "weighting": "num_examples"}
_ALTERNATING = {**_PARTIAL, "personal_steps": None, "personal_epochs": None}


def _phase(model, blocks, examples, n, max_examples, key, schedule, lr, start, trained,
           frozen=None, scale=1.0, penalty_grad=None):
    """Plain SGD of one block ("personal", "shared" or "joint" = (v, u)) of one client.

    The step objective is scale * f(merged params) + penalty; the recorded losses are f's.
    """
    def data_grad(block, rows, step_key):
        if trained == "personal":
            params = blocks.merge(block, frozen)
        elif trained == "shared":
            params = blocks.merge(frozen, block)
        else:
            params = blocks.merge(*block)
        loss, grad = loss_and_grad(model, params, examples, rows, step_key)
        g_v, g_u = blocks.split(grad)
        g = {"personal": g_v, "shared": g_u, "joint": (g_v, g_u)}[trained]
        return loss, tree_scale(scale, g)

    return sgd(key, n, max_examples, schedule, lr, start, data_grad, penalty_grad)


def _drift(u_i, u) -> float:
    """sum over shared tensors of ||u_i - u||_F."""
    return sum(float(np.sqrt(np.sum((a - b) ** 2)))
               for a, b in zip(jax.tree.leaves(f64(u_i)), jax.tree.leaves(f64(u))))


def _mean(trees, weights):
    total = float(sum(weights))
    return jax.tree.map(lambda *xs: sum(w * x for w, x in zip(weights, xs)) / total, *trees)


def _naive_partial(model, state, train, key, cfg, mode):
    check_sgd(cfg)
    blocks = Blocks.of(model, cfg["personal"])
    ids, client_key = cohort(train, key, cfg["clients_per_round"])
    clients = Clients(train)
    lr = float(state.hparams["client_lr"])
    u = as_numpy(state.shared)
    shared = Schedule.of(cfg["batch_size"], cfg["local_steps"], cfg["local_epochs"])
    personal = shared
    if cfg.get("personal_steps") is not None or cfg.get("personal_epochs") is not None:
        personal = Schedule.of(cfg["batch_size"], cfg["personal_steps"], cfg["personal_epochs"])
    rows = [stacked_row(state.client_personal, i) for i in range(train.num_clients)]
    shared_rows, weights, loss_num, n_sum, drifts = [], [], 0.0, 0.0, []
    for i in ids:
        examples, n, k = clients.examples(i), clients.n[i], jax.random.fold_in(client_key, i)
        common = (model, blocks, examples, n, clients.max_examples)
        if mode == "alternating":  # v with u frozen, then u_i from u with the new v frozen
            v = _phase(*common, jax.random.fold_in(k, 0), personal, lr, rows[i], "personal",
                       u).params
            run = _phase(*common, jax.random.fold_in(k, 1), shared, lr, u, "shared", v)
            u_i = run.params
        else:  # (v, u_i) together on the same minibatches
            run = _phase(*common, jax.random.fold_in(k, 1), shared, lr, (rows[i], u), "joint")
            v, u_i = run.params
        rows[i] = v
        shared_rows.append(f64(u_i))
        weights.append(float(n) if cfg["weighting"] == "num_examples" else float(n > 0))
        loss_num, n_sum = loss_num + n * run.mean_loss(), n_sum + n
        if n > 0:
            drifts.append(_drift(u_i, u))
    if sum(weights) > 0:
        u = jax.tree.map(lambda a: np.asarray(a, np.float32), _mean(shared_rows, weights))
    new = state.replace(round=state.round + 1, shared=u, client_personal=stack(rows))
    return new, {"train_loss": loss_num / max(n_sum, 1.0),
                 "drift": float(np.mean(drifts)) if drifts else 0.0}


def _naive_fedapm(model, state, train, key, cfg):
    check_sgd(cfg)
    blocks = Blocks.of(model, cfg["personal"])
    ids, client_key = cohort(train, key, cfg["clients_per_round"])
    clients = Clients(train)
    hp = {k: float(v) for k, v in state.hparams.items()}
    lr, rho, sigma, wd = hp["client_lr"], hp["rho"], hp["sigma"], hp["weight_decay"]
    epochs = 3 if cfg["local_steps"] is None and cfg["local_epochs"] is None \
        else cfg["local_epochs"]
    schedule = Schedule.of(cfg["batch_size"], cfg["local_steps"], epochs)
    has = np.asarray(clients.n) > 0
    alpha = 1.0 / max(int(has.sum()), 1) if cfg["client_weight"] == "uniform" else 1.0
    u = as_numpy(state.shared)
    m = train.num_clients
    v_rows = [stacked_row(state.client_personal, i) for i in range(m)]
    u_rows = [f64(stacked_row(state.client_shared, i)) for i in range(m)]
    d_rows = [f64(stacked_row(state.client_dual, i)) for i in range(m)]
    loss_num, n_sum, drifts = 0.0, 0.0, []
    for i in ids:
        examples, n, k = clients.examples(i), clients.n[i], jax.random.fold_in(client_key, i)
        common = (model, blocks, examples, n, clients.max_examples)
        v_old, dual = v_rows[i], as_numpy(d_rows[i])
        # personal: alpha (f + wd/2 ||v||^2) + sigma/2 ||v - v_old||^2
        v = _phase(*common, jax.random.fold_in(k, 0), schedule, lr, v_old, "personal", u,
                   alpha, lambda p, v_old=v_old: tree_add(tree_scale(alpha * wd, p),
                                                          sq_dist_grad(sigma, p, v_old))).params
        # shared, from u: alpha (f + wd/2 ||u_i||^2) + <pi_i, u_i - u> + rho/2 ||u_i - u||^2
        run = _phase(*common, jax.random.fold_in(k, 1), schedule, lr, u, "shared", v, alpha,
                     lambda p, dual=dual: tree_add(tree_scale(alpha * wd, p), dual,
                                                   sq_dist_grad(rho, p, u)))
        v_rows[i] = v
        u_rows[i] = f64(run.params)
        # dual ascent: pi_i <- pi_i + rho (u_i - u)
        d_rows[i] = jax.tree.map(lambda p, a, b: p + rho * (a - b), d_rows[i], u_rows[i], f64(u))
        loss_num, n_sum = loss_num + n * run.mean_loss(), n_sum + n
        if n > 0:
            drifts.append(_drift(run.params, u))
    members = np.flatnonzero(has) if cfg["server_average"] == "all" else [i for i in ids
                                                                          if has[i]]
    if len(members):  # u = mean over members of u_i + pi_i / rho (stale rows included)
        z = [jax.tree.map(lambda a, p: a + (p / rho if rho > 0 else 0.0), u_rows[i], d_rows[i])
             for i in members]
        u = jax.tree.map(lambda a: np.asarray(a, np.float32), _mean(z, [1.0] * len(z)))
    new = state.replace(round=state.round + 1, shared=u, client_personal=stack(v_rows),
                        client_shared=stack(u_rows), client_dual=stack(d_rows))
    return new, {"train_loss": loss_num / max(n_sum, 1.0),
                 "drift": float(np.mean(drifts)) if drifts else 0.0}


NAIVE_ROUNDS = {
    "fedalt": functools.partial(_naive_partial, mode="alternating"),
    "fedrep": functools.partial(_naive_partial, mode="alternating"),
    "fedsim": functools.partial(_naive_partial, mode="simultaneous"),
    "fedper": functools.partial(_naive_partial, mode="simultaneous"),
    "fedapm": _naive_fedapm,
}

DEFAULTS = {
    "fedalt": {**_ALTERNATING, "personal": ("head",)},
    "fedrep": {**_ALTERNATING, "personal": ("head",)},
    "fedsim": {**_PARTIAL, "personal": ("head",)},
    "fedper": {**_PARTIAL, "personal": ("head",)},
    "fedapm": {**_PARTIAL, "batch_size": 50, "personal": ("head",), "client_weight": "uniform",
               "server_average": "all"},
}
