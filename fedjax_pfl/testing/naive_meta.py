"""Naive per-client references of nu-step meta-FL, Per-FedAvg and pFedMe.

Plain Python loops over the cohort, the local steps and the nu inner steps. The
exact meta-gradient is the explicit backward recursion
  v <- g = grad f(w^(nu); D'),  v <- v - alpha H(w^(j); D''_j) v  for j = nu-1 .. 0
with Hessian-vector products (`jax.jvp` of the gradient of ONE batch's loss), not
autodiff through the unroll; "hf" replaces H v by central differences of the
gradient, "fo" drops the factors. The server average is float64 NumPy.

Minibatches (the randomness contract, re-derived from `jax.random`): the outer
batches D' are a local run's (`local_reference.minibatches` with the plan half of
the client key); with the step half s, the k-th NON-EMPTY step draws its nu inner
batches D_j as `randint(fold_in(fold_in(s, 0), k), (nu, B_in), 0, max(n, 1))` and
its Hessian batches D''_j from `fold_in(fold_in(s, 1), k)` (or reuses D_j, MAML's
"shared"). pFedMe's R steps use `minibatches` with the client key itself.

The fine-tuning evaluation (`naive_finetune_evaluate`) runs nu' plain SGD steps
per client on the minibatches `minibatches(fold_in(key(seed), i), ...)` in step
mode (or the full local gradient), testing the model before each step and after
the last.
"""

from __future__ import annotations

import jax
import numpy as np

from fedjax_pfl.testing.common import Clients, cohort, f64, stack, stacked_row
from fedjax_pfl.testing.local_reference import (
    Schedule,
    as_numpy,
    check_sgd,
    hessian_vector,
    loss_and_grad,
    minibatches,
    tree_axpy,
)

_META = {"clients_per_round": None, "nu": 1, "mode": "exact", "batch_size": 32,
         "inner_batch_size": None, "hessian_batch_size": None, "local_steps": 10,
         "local_epochs": None, "client_optimizer": "sgd", "hessian_batches": "independent",
         "aggregation": "mean", "eval_lr": None, "eval_steps": None, "eval_max_steps": None,
         "eval_batch_size": None, "eval_full_batch": False, "eval_seed": 0}
_PFEDME = {"clients_per_round": None, "inner_steps": 5, "batch_size": 20, "local_steps": 20,
           "local_epochs": None, "weighting": "num_examples", "train_all_clients": False}


def _server_average(server, clients, weights):
    """server + sum_i w_i (c_i - server) / sum_i w_i (no move without weight), float64."""
    total = jax.tree.map(lambda s: np.zeros(np.shape(s)), server)
    for c, w in zip(clients, weights):
        total = jax.tree.map(lambda t, a, b, w=w: t + w * (a - b), total, f64(c), f64(server))
    weight_sum = float(sum(weights))
    return jax.tree.map(lambda s, t: s + (t / weight_sum if weight_sum > 0 else 0 * t),
                        f64(server), total)


def _meta_client(model, params, examples, n, max_examples, key, cfg, hp):
    """ONE client's tau meta steps: (trained params, row-weighted mean outer loss)."""
    nu, mode, shared = cfg["nu"], cfg["mode"], cfg["hessian_batches"] == "shared"
    b_in = cfg["inner_batch_size"] or cfg["batch_size"]
    b_h = cfg["hessian_batch_size"] or cfg["batch_size"]
    alpha, beta, delta = hp["inner_lr"], hp["client_lr"], hp["delta"]
    schedule = Schedule.of(cfg["batch_size"], cfg["local_steps"], cfg["local_epochs"])
    plan_key, step_key = jax.random.split(key)
    inner_key, hess_key = jax.random.fold_in(step_key, 0), jax.random.fold_in(step_key, 1)
    grad = lambda p, rows: loss_and_grad(model, p, examples, rows)
    num, den, k = 0.0, 0, 0
    for outer in minibatches(plan_key, n, max_examples, schedule):
        if len(outer) == 0:
            continue  # an empty step is a no-op (and does not count in k)
        high = max(n, 1)
        inner = np.asarray(jax.random.randint(jax.random.fold_in(inner_key, k), (nu, b_in), 0,
                                              high))
        hess = inner if shared else np.asarray(jax.random.randint(
            jax.random.fold_in(hess_key, k), (nu, b_h), 0, high))
        k += 1
        iterates = [params]  # w^(0) .. w^(nu): nu SGD steps with alpha on D_0 .. D_{nu-1}
        for j in range(nu):
            iterates.append(tree_axpy(-alpha, grad(iterates[-1], inner[j])[1], iterates[-1]))
        value, v = grad(iterates[-1], outer)
        if mode != "fo":
            for j in reversed(range(nu)):  # v <- (I - alpha H(w^(j); D''_j)) v
                if mode == "exact":
                    hv = hessian_vector(model, iterates[j], v, examples, hess[j])
                else:
                    g_plus = grad(tree_axpy(delta, v, iterates[j]), hess[j])[1]
                    g_minus = grad(tree_axpy(-delta, v, iterates[j]), hess[j])[1]
                    hv = jax.tree.map(lambda a, b: (a - b) / (2 * delta), g_plus, g_minus)
                v = tree_axpy(-alpha, hv, v)
        params = tree_axpy(-beta, v, params)  # plain SGD with beta on the meta-gradient
        num, den = num + len(outer) * value, den + len(outer)
    return params, (num / den if den else 0.0)


def _naive_meta_fl(model, state, train, key, cfg):
    check_sgd(cfg)
    ids, client_key = cohort(train, key, cfg["clients_per_round"])
    clients = Clients(train)
    hp = {k: float(v) for k, v in state.hparams.items()}
    server = as_numpy(state.params)
    trained, weights, loss_num, n_sum = [], [], 0.0, 0.0
    for i in ids:
        n = clients.n[i]
        params, loss = _meta_client(model, server, clients.examples(i), n, clients.max_examples,
                                    jax.random.fold_in(client_key, i), cfg, hp)
        trained.append(params)
        weights.append(float(n) if cfg["aggregation"] == "weighted" else float(n > 0))
        loss_num += n * loss
        n_sum += n
    params = jax.tree.map(lambda a: np.asarray(a, np.float32),
                          _server_average(server, trained, weights))
    new = state.replace(round=state.round + 1, params=params)
    return new, {"train_loss": loss_num / max(n_sum, 1.0)}


def _naive_per_fedavg(model, state, train, key, cfg):
    return _naive_meta_fl(model, state, train, key, {**cfg, "nu": 1})


def _pfedme_client(model, params, personal, examples, n, max_examples, key, cfg, hp):
    """ONE client's R pFedMe steps: (local copy w_i, personal theta_i, mean loss)."""
    schedule = Schedule.of(cfg["batch_size"], cfg["local_steps"], cfg["local_epochs"])
    lam, mu = hp["lam"], hp["mu"]
    w_local, theta = params, params  # both start at the global model
    num, den = 0.0, 0
    for rows in minibatches(key, n, max_examples, schedule):  # the client key itself
        if len(rows) == 0:
            continue
        for _ in range(cfg["inner_steps"]):
            # theta <- theta - eta_p (grad f(theta; D) + lam (theta - w_i) + mu theta)
            g = loss_and_grad(model, theta, examples, rows)[1]
            g = jax.tree.map(lambda gt, t, wl: gt + lam * (t - wl) + mu * t, g, theta, w_local)
            theta = tree_axpy(-hp["personal_lr"], g, theta)
        # w_i <- w_i - eta lam (w_i - theta)
        w_local = tree_axpy(-hp["client_lr"] * lam,
                            jax.tree.map(np.subtract, w_local, theta), w_local)
        loss = loss_and_grad(model, theta, examples, rows)[0]
        num, den = num + len(rows) * loss, den + len(rows)
    if den == 0:  # a client that never stepped keeps its stored personal model
        theta = personal
    return w_local, theta, (num / den if den else 0.0)


def _naive_pfedme(model, state, train, key, cfg):
    ids, client_key = cohort(train, key, cfg["clients_per_round"])
    clients = Clients(train)
    hp = {k: float(v) for k, v in state.hparams.items()}
    server = as_numpy(state.params)
    rows = [stacked_row(state.client_params, i) for i in range(train.num_clients)]
    local_copies, weights, loss_num, n_sum = [], [], 0.0, 0.0
    # The released code's mode: every client trains, only the sampled ones are averaged.
    trained = range(train.num_clients) if cfg["train_all_clients"] else ids
    for i in trained:
        n = clients.n[i]
        w_local, rows[i], loss = _pfedme_client(model, server, rows[i], clients.examples(i), n,
                                                clients.max_examples,
                                                jax.random.fold_in(client_key, i), cfg, hp)
        loss_num += n * loss
        n_sum += n
        if i in ids:
            local_copies.append(w_local)
            weights.append(float(n) if cfg["weighting"] == "num_examples" else float(n > 0))
    # w <- (1 - beta) w + beta sum_i p_i w_i  =  w + beta (mean_i w_i - w)
    mean = _server_average(server, local_copies, weights)
    beta = hp["beta"]
    params = jax.tree.map(lambda s, m: np.asarray(s + beta * (m - s), np.float32), f64(server),
                          mean)
    new = state.replace(round=state.round + 1, params=params, client_params=stack(rows))
    return new, {"train_loss": loss_num / max(n_sum, 1.0)}


def _test_stats(model, params, examples, n):
    """(num_correct, loss_sum) of `params` on the n valid test rows, float64
    (classification models: one label per row)."""
    if n == 0:
        return 0.0, 0.0
    batch = {k: v[:n] for k, v in examples.items()}
    logits = model.apply(params, batch, None)
    losses = np.asarray(model.loss(logits, batch), np.float64)
    correct = np.asarray(np.argmax(np.asarray(logits), -1) == np.asarray(batch["y"]))
    return float(np.sum(correct)), float(np.sum(losses))


def naive_finetune_evaluate(model, params, train, test, lr: float, *, max_steps: int,
                            report_step: int, batch_size: int, full_batch: bool = False,
                            seed: int = 0) -> dict:
    """The fine-tuning evaluation of a global model, one client and one step at a time.

    Client i runs `max_steps` plain SGD steps of step `lr` from `params` on the
    minibatches `minibatches(fold_in(key(seed), i), ...)` in step mode (or, with
    `full_batch`, on all its n_i rows), and is tested before every step and after
    the last one.

    Returns:
      {num_examples, num_correct, loss_sum} [M] (after `report_step` steps) and
      {curve_num_correct, curve_loss_sum} [M, max_steps + 1], float64.
    """
    train_clients, test_clients = Clients(train), Clients(test)
    base = jax.random.key(seed)
    schedule = Schedule.of(batch_size, max_steps, None)
    curves_correct, curves_loss = [], []
    for i in range(train.num_clients):
        examples, n = train_clients.examples(i), train_clients.n[i]
        if full_batch:
            steps = [np.arange(n)] * max_steps
        else:
            steps = minibatches(jax.random.fold_in(base, i), n, train_clients.max_examples,
                                schedule)
        p = as_numpy(params)
        correct, losses = [], []
        for rows in [*steps, None]:
            c, loss = _test_stats(model, p, test_clients.examples(i), test_clients.n[i])
            correct.append(c)
            losses.append(loss)
            if rows is not None and len(rows) > 0:
                p = tree_axpy(-lr, loss_and_grad(model, p, examples, rows)[1], p)
        curves_correct.append(correct)
        curves_loss.append(losses)
    curve_correct, curve_loss = np.asarray(curves_correct), np.asarray(curves_loss)
    return {"num_examples": np.asarray(test_clients.n, np.float64),
            "num_correct": curve_correct[:, report_step], "loss_sum": curve_loss[:, report_step],
            "curve_num_correct": curve_correct, "curve_loss_sum": curve_loss}


def _naive_meta_evaluate(model, state, train, test, cfg):
    """meta-FL's evaluation: nu' fine-tuning steps with `eval_lr` (default: alpha)."""
    nu = cfg["nu"]
    report = nu if cfg["eval_steps"] is None else cfg["eval_steps"]
    max_steps = max(5, report) if cfg["eval_max_steps"] is None else cfg["eval_max_steps"]
    batch_size = (cfg["eval_batch_size"] or cfg["inner_batch_size"] or cfg["batch_size"])
    # The traced values (they may have been swept): eval_lr when set, else alpha.
    lr = float(state.hparams["inner_lr" if cfg["eval_lr"] is None else "eval_lr"])
    return naive_finetune_evaluate(model, state.params, train, test, lr, max_steps=max_steps,
                                   report_step=report, batch_size=batch_size,
                                   full_batch=cfg["eval_full_batch"], seed=cfg["eval_seed"])


NAIVE_ROUNDS = {
    "meta_fl": _naive_meta_fl,
    "per_fedavg": _naive_per_fedavg,
    "pfedme": _naive_pfedme,
}

NAIVE_EVALUATES = {
    "meta_fl": _naive_meta_evaluate,
    "per_fedavg": lambda model, state, train, test, cfg: _naive_meta_evaluate(
        model, state, train, test, {**cfg, "nu": 1}),
}

DEFAULTS = {
    "meta_fl": _META,
    "per_fedavg": {**{k: v for k, v in _META.items() if k != "nu"}, "mode": "hf"},
    "pfedme": _PFEDME,
}
