"""Naive per-client references of FedAvg, FedProx, FedAvg-FT and Local.

FedAvg (McMahan et al. 2017): each cohort client runs plain SGD from the server
model w on its own minibatches; the server moves w by the n_i-weighted (or
uniform over clients with data) mean of the client deltas, times `server_lr`.
FedProx adds mu/2 ||w_i - w||^2 to every step's objective, i.e. mu (w_i - w) to
its gradient. FedAvg-FT trains as FedAvg. Local trains each client's own model
and communicates nothing.
"""

from __future__ import annotations

import jax
import numpy as np

from fedjax_pfl.testing.common import Clients, cohort, f64, stack, stacked_row
from fedjax_pfl.testing.local_reference import (
    Schedule,
    as_numpy,
    check_sgd,
    server_sgd,
    sq_dist_grad,
    train_model,
)

_SCHEDULE = {"clients_per_round": None, "batch_size": 32, "local_steps": None,
             "local_epochs": None, "client_optimizer": "sgd"}
_FEDAVG = {**_SCHEDULE, "server_optimizer": "sgd", "weighting": "num_examples"}


def _schedule(cfg) -> Schedule:
    return Schedule.of(cfg["batch_size"], cfg["local_steps"], cfg["local_epochs"])


def _naive_fedavg(model, state, train, key, cfg):
    check_sgd(cfg)
    ids, client_key = cohort(train, key, cfg["clients_per_round"])
    clients = Clients(train)
    hp = {k: float(v) for k, v in state.hparams.items()}
    mu = hp.get("mu")  # FedProx
    server = as_numpy(state.params)
    total = jax.tree.map(np.zeros_like, f64(server))
    weight_sum, loss_num, n_sum = 0.0, 0.0, 0.0
    for i in ids:
        n = clients.n[i]
        prox = None if mu is None else (lambda p: sq_dist_grad(mu, p, server))
        run = train_model(model, server, clients.examples(i), n,
                          jax.random.fold_in(client_key, i), _schedule(cfg), hp["client_lr"],
                          prox)
        w = float(n) if cfg["weighting"] == "num_examples" else float(n > 0)
        total = jax.tree.map(lambda t, c, s, w=w: t + w * (c - s), total, f64(run.params),
                             f64(server))
        weight_sum += w
        loss_num += n * run.mean_loss()
        n_sum += n
    mean = jax.tree.map(lambda t: t / weight_sum if weight_sum > 0 else 0 * t, total)
    new = state.replace(round=state.round + 1,
                        params=server_sgd(cfg, state.hparams, state.params, mean))
    return new, {"train_loss": loss_num / max(n_sum, 1.0)}


def _naive_local(model, state, train, key, cfg):
    check_sgd(cfg)
    ids, client_key = cohort(train, key, cfg["clients_per_round"])
    clients = Clients(train)
    lr = float(state.hparams["client_lr"])
    rows = [stacked_row(state.client_params, i) for i in range(train.num_clients)]
    loss_num, n_sum = 0.0, 0.0
    for i in ids:
        n = clients.n[i]
        run = train_model(model, rows[i], clients.examples(i), n,
                          jax.random.fold_in(client_key, i), _schedule(cfg), lr)
        rows[i] = run.params
        loss_num += n * run.mean_loss()
        n_sum += n
    new = state.replace(round=state.round + 1, client_params=stack(rows))
    return new, {"train_loss": loss_num / max(n_sum, 1.0)}


NAIVE_ROUNDS = {
    "fedavg": _naive_fedavg,
    "fedprox": _naive_fedavg,
    "fedavg_ft": _naive_fedavg,
    "local": _naive_local,
}

# The factory defaults of the arguments each reference reads (checked against the
# factories' signatures by the test suite).
DEFAULTS = {
    "fedavg": _FEDAVG,
    "fedprox": _FEDAVG,
    "fedavg_ft": _FEDAVG,
    "local": _SCHEDULE,
}
