"""Naive per-client references of FedAvg, FedProx, FedAvg-FT and Local."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax

from fedjax_pfl.core import local
from fedjax_pfl.testing.common import client_row, cohort, f64, train_one


def _naive_fedavg(model, state, train, key, cfg):
    ids, client_key = cohort(train, key, cfg["clients_per_round"])
    hp = {k: float(v) for k, v in state.hparams.items()}
    server = state.params
    total, weight_sum, loss_num, n_sum = None, 0.0, 0.0, 0.0
    for i in ids:
        result = train_one(model, cfg, server, client_row(train, i),
                           jax.random.fold_in(client_key, i), hp["client_lr"], hp.get("mu"), server)
        n = float(train.num_examples[i])
        w = n if cfg["weighting"] == "num_examples" else float(n > 0)
        delta = jax.tree.map(lambda c, s, w=w: w * (c - s), f64(result.params), f64(server))
        total = delta if total is None else jax.tree.map(np.add, total, delta)
        weight_sum += w
        loss_num += n * float(result.mean_loss())
        n_sum += n
    mean = jax.tree.map(lambda d: d / weight_sum if weight_sum > 0 else 0 * d, total)
    opt = local.make_optimizer(cfg["server_optimizer"], hp["server_lr"])
    updates, opt_state = opt.update(jax.tree.map(lambda d: -jnp.asarray(d, jnp.float32), mean),
                                    state.opt_state, server)
    new = state.replace(round=state.round + 1, params=optax.apply_updates(server, updates),
                        opt_state=opt_state)
    return new, {"train_loss": loss_num / max(n_sum, 1.0)}


def _naive_local(model, state, train, key, cfg):
    ids, client_key = cohort(train, key, cfg["clients_per_round"])
    lr = float(state.hparams["client_lr"])
    rows = [f64(client_row(state.client_params, i)) for i in range(train.num_clients)]
    loss_num, n_sum = 0.0, 0.0
    for i in ids:
        own = client_row(state.client_params, i)
        result = train_one(model, cfg, own, client_row(train, i),
                            jax.random.fold_in(client_key, i), lr)
        rows[i] = f64(result.params)
        n = float(train.num_examples[i])
        loss_num += n * float(result.mean_loss())
        n_sum += n
    stacked = jax.tree.map(lambda *r: jnp.asarray(np.stack(r), jnp.float32), *rows)
    new = state.replace(round=state.round + 1, client_params=stacked)
    return new, {"train_loss": loss_num / max(n_sum, 1.0)}


NAIVE_ROUNDS = {
    "fedavg": _naive_fedavg,
    "fedprox": _naive_fedavg,
    "fedavg_ft": _naive_fedavg,
    "local": _naive_local,
}


