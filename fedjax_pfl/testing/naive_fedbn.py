"""Naive per-client reference of FedBN (Li et al., ICLR 2021).

Each cohort client starts from (its own BN part v_i, the server's rest u), runs
plain SGD over its minibatches (`local_reference.minibatches`, the package's
documented batch plan re-derived from `jax.random`) and keeps its new v_i; the
server sets u to the float64 weighted mean of the clients' u_i.

For `models.mlp_bn` (params {"params": {hidden_i, bn_i, head}, "batch_stats":
{bn_i: {mean, var}}}) the forward pass is written out here: Dense, BatchNorm
with the minibatch's own mean and biased variance (eps 1e-5), ReLU, ..., head;
the loss is the mean softmax cross-entropy over the step's rows. After each SGD
step (which leaves the statistics alone) the running statistics move by
running = 0.9 running + 0.1 (batch statistic of the NEW weights on the same
rows). Any other model must have no BatchNorm; it is trained as FedAvg
(`local_reference.train_model`).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from fedjax_pfl.testing.common import Clients, cohort, f64, stack, stacked_row
from fedjax_pfl.testing.local_reference import (
    Blocks,
    Run,
    Schedule,
    as_numpy,
    check_sgd,
    leaf_paths,
    minibatches,
    train_model,
)

EPS, MOMENTUM = 1e-5, 0.1


def mlp_bn_forward(params, stats, x, train: bool):
    """(logits, {bn_i: (batch mean, biased batch var)}) of the MLP-BN on rows `x`.

    Training normalizes with the rows' own statistics, evaluation with `stats`.
    """
    h = jnp.reshape(x, (x.shape[0], int(np.prod(x.shape[1:]))))
    batch = {}
    i = 0
    while f"hidden_{i}" in params:
        dense, bn = params[f"hidden_{i}"], params[f"bn_{i}"]
        z = h @ dense["kernel"] + dense["bias"][None, :]
        if train:
            mean = jnp.mean(z, axis=0, keepdims=True)
            var = jnp.mean((z - mean) ** 2, axis=0, keepdims=True)
            batch[f"bn_{i}"] = (mean[0], var[0])
        else:
            mean, var = stats[f"bn_{i}"]["mean"][None, :], stats[f"bn_{i}"]["var"][None, :]
        z = (z - mean) / jnp.sqrt(var + EPS) * bn["scale"][None, :] + bn["bias"][None, :]
        h = jnp.maximum(z, 0.0)
        i += 1
    return h @ params["head"]["kernel"] + params["head"]["bias"][None, :], batch


def _mean_ce(params, x, y):
    logits, _ = mlp_bn_forward(params, None, x, True)
    logz = jax.scipy.special.logsumexp(logits, axis=1)
    return jnp.mean(logz - jnp.take_along_axis(logits, y[:, None], axis=1)[:, 0])


_loss_grad = jax.jit(jax.value_and_grad(_mean_ce))
_batch_stats = jax.jit(lambda p, x: mlp_bn_forward(p, None, x, True)[1])


def train_mlp_bn(params, examples: dict, n: int, key, schedule: Schedule, lr: float) -> Run:
    """Plain SGD of the MLP-BN on one client, with the running-statistics update."""
    weights, stats = as_numpy(params["params"]), as_numpy(params["batch_stats"])
    plan_key, _ = jax.random.split(key)
    losses, counts = [], []
    for rows in minibatches(plan_key, n, len(examples["y"]), schedule):
        if len(rows) == 0:
            losses.append(0.0)
            counts.append(0)
            continue
        x, y = examples["x"][rows], examples["y"][rows]
        loss, grad = _loss_grad(weights, x, y)
        weights = jax.tree.map(lambda w, g: np.asarray(w - lr * np.asarray(g), np.float32),
                               weights, grad)
        for name, (mean, var) in _batch_stats(weights, x).items():
            old = stats[name]
            stats[name] = {k: np.asarray((1 - MOMENTUM) * old[k] + MOMENTUM * np.asarray(new),
                                         np.float32)
                           for k, new in (("mean", mean), ("var", var))}
        losses.append(float(loss))
        counts.append(len(rows))
    return Run({"params": weights, "batch_stats": stats}, losses, counts)


@functools.lru_cache(maxsize=16)
def _default_personal(model):
    """The BN leaves: every batch_stats leaf and the params of modules with statistics."""
    paths = leaf_paths(jax.eval_shape(model.init, jax.random.key(0)))
    modules = {p.split("/")[1] for p in paths if p.startswith("batch_stats/")}
    chosen = {p for p in paths if p.startswith("batch_stats/")
              or (p.startswith("params/") and p.split("/")[1] in modules)}
    return lambda path: path in chosen


def _naive_fedbn(model, state, train, key, cfg):
    check_sgd(cfg)
    label = cfg["personal"] if cfg["personal"] is not None else _default_personal(model)
    blocks = Blocks.of(model, label)
    has_bn = any(p.startswith("batch_stats/") for p in blocks.paths)
    ids, client_key = cohort(train, key, cfg["clients_per_round"])
    clients = Clients(train)
    lr = float(state.hparams["client_lr"])
    schedule = Schedule.of(cfg["batch_size"], cfg["local_steps"], cfg["local_epochs"])
    u = as_numpy(state.shared)
    rows = [stacked_row(state.client_personal, i) for i in range(train.num_clients)]
    shared_rows, weights, loss_num, n_sum = [], [], 0.0, 0.0
    for i in ids:
        examples, n, k = clients.examples(i), clients.n[i], jax.random.fold_in(client_key, i)
        params = blocks.merge(rows[i], u)
        if has_bn:
            run = train_mlp_bn(params, examples, n, k, schedule, lr)
        else:
            run = train_model(model, params, examples, n, k, schedule, lr)
        rows[i], u_i = blocks.split(run.params)
        shared_rows.append(f64(u_i))
        weights.append(float(n) if cfg["weighting"] == "num_examples" else float(n > 0))
        loss_num, n_sum = loss_num + n * run.mean_loss(), n_sum + n
    if sum(weights) > 0:
        total = float(sum(weights))
        u = jax.tree.map(lambda *xs: np.asarray(sum(w * x for w, x in zip(weights, xs)) / total,
                                                np.float32), *shared_rows)
    new = state.replace(round=state.round + 1, shared=u, client_personal=stack(rows))
    return new, {"train_loss": loss_num / max(n_sum, 1.0)}


NAIVE_ROUNDS = {"fedbn": _naive_fedbn}

DEFAULTS = {
    "fedbn": {"clients_per_round": None, "batch_size": 32, "local_steps": None,
              "local_epochs": None, "client_optimizer": "sgd", "weighting": "num_examples",
              "personal": None},
}
