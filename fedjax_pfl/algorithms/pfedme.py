"""pFedMe: personalized FL with Moreau envelopes.

Reference:
  Dinh, Tran, Nguyen, "Personalized Federated Learning with Moreau Envelopes",
  NeurIPS 2020 (arXiv 2006.08848), Algorithm 1; code github.com/CharlieDinh/pFedMe.

Client i keeps a local copy w_i of the global model and a personal model
theta_i. Each of its R local steps draws a minibatch D and
  1. approximately solves min_theta f_i(theta; D) + lambda/2 ||theta - w_i||^2
     + mu/2 ||theta||^2 by K gradient steps theta <- theta - eta_p (grad
     f_i(theta; D) + lambda (theta - w_i) + mu theta),
  2. moves the local copy: w_i <- w_i - eta lambda (w_i - theta).
Both start at the global w each round (as in the code, where theta carries over
between the R steps). The server sets w <- (1 - beta) w + beta sum_i p_i w_i.
Evaluation tests each client's last personal model theta_i (stacked [M, ...];
clients never sampled keep the initial model, unless `train_all_clients`).

Paper symbol -> argument: lambda -> `lam`, K -> `inner_steps`, eta_p (the
inner solver's step, code `personal_learning_rate`) -> `personal_lr`, eta ->
`client_lr`, beta -> `beta`, R -> `local_steps`, |D| -> `batch_size`, S ->
`clients_per_round`. Defaults are the code's MNIST ones (lambda 15, K 5,
eta_p 0.1, eta 0.005, beta 1, R 20, |D| 20). The code averages the local copies
weighted by n_i (default); the paper's 1/S mean is `weighting="uniform"`.

Two more differences between the paper and the released code, each a flag
whose default is the paper's reading:
  * Who trains. Algorithm 1 samples S clients, and only they train. The code
    (FLAlgorithms/servers/serverpFedMe.py, `train`) runs the R local steps on
    EVERY client, then samples S of them and aggregates only their local
    copies, so every personal model is refreshed every round.
    `train_all_clients=True` (static) does that: all M clients train with
    their usual keys and update their personal models; the cohort (the same
    ids as in the default mode) is what the server averages, so the global
    model is the same in both modes; only the other clients' personal models
    and the train loss (over every client that trained) differ. It costs M
    clients' compute per round instead of S.
  * mu. The code's personal solver (FLAlgorithms/optimizers/fedoptimizer.py,
    `pFedMeOptimizer`, default mu = 0.001) adds mu theta to the sub-problem's
    gradient: an L2 penalty mu/2 ||theta||^2 on theta only. The paper has no
    such term. `mu` (traced; default 0, the paper) sets it.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import optax
from flax import struct

from fedjax_pfl.core import aggregation, config, local, server
from fedjax_pfl.core import execution as ex
from fedjax_pfl.core import round as round_lib
from fedjax_pfl.core.algorithm import FederatedAlgorithm
from fedjax_pfl.models.model import Model


@struct.dataclass
class PFedMeState:
    """pFedMe's round, global model w (`params`), every client's personal model
    theta_i (`client_params`, leaves [M, ...]); `hparams`: client_lr (eta),
    personal_lr (eta_p), lam, beta, mu."""

    round: jax.Array
    params: object
    client_params: object
    hparams: dict


@dataclasses.dataclass(frozen=True, kw_only=True)
class PFedMeConfig(config.Config):
    """pFedMe's hyperparameters (`config.Config`'s but the client optimizer;
    symbols: module docstring). Traced: lam, personal_lr, client_lr, beta, mu;
    static: inner_steps (K), train_all_clients, the R-step schedule (epoch mode
    masks empty steps), weighting ("num_examples", the code, or "uniform")."""

    lam: float = config.number(15.0)
    inner_steps: int = config.integer(5)
    personal_lr: float = config.number(0.1)
    client_lr: float = config.number(0.005)
    beta: float = config.number(1.0)
    mu: float = config.number(0.0)
    train_all_clients: bool = config.flag(False)
    batch_size: int = 20
    local_steps: int | None = 20
    weighting: str = config.weighting()


def pfedme_step(loss_fn, hp, inner_steps: int):
    """One of the R local steps on the carry (w_i, theta): K prox steps, then w_i moves."""
    def step(carry, batch, w, _):
        w_local, theta = carry
        data_loss = lambda p: jnp.sum(w * loss_fn(p, batch, None))

        def inner(th, _):
            g = jax.grad(data_loss)(th)
            return jax.tree.map(lambda t, gt, wl: t - hp["personal_lr"] * (
                gt + hp["lam"] * (t - wl) + hp["mu"] * t), th, g, w_local), None

        theta_new = jax.lax.scan(inner, theta, None, length=inner_steps)[0]
        w_new = jax.tree.map(lambda wl, t: wl - hp["client_lr"] * hp["lam"] * (wl - t),
                             w_local, theta_new)
        return (w_new, theta_new), data_loss(theta_new)

    return step


@config.factory(PFedMeConfig, fixed={"client_optimizer": "sgd"})
def pfedme(model: Model, cfg: PFedMeConfig) -> FederatedAlgorithm:
    """pFedMe (see the module docstring for the symbols); hyperparameters: `PFedMeConfig`."""
    loss_fn = local.model_loss_fn(model)

    def init(key, train, params=None):
        params, hp, _ = server.init(model, cfg, key, train, params)
        return PFedMeState(jnp.zeros((), jnp.int32), params,
                           round_lib.replicate(params, train.num_clients), hp)

    def client_update(broadcast, x):
        params, hp = broadcast
        personal, data, key, weight = x
        idx, weights = cfg.schedule.plan(key, data)
        result = local.scan_plan(pfedme_step(loss_fn, hp, cfg.inner_steps), (params, params),
                                 data, idx, weights)
        w_local, theta = result.params  # a client that never stepped keeps its theta_i:
        theta = optax.tree.where(jnp.sum(result.counts) > 0, theta, personal)
        return (theta, result.mean_loss()), aggregation.weighted_delta(w_local, params, weight)

    def round_fn(state, train, key, cohort=None):
        cohort, data, keys, n = round_lib.start(
            key, train, cfg.clients_per_round, cohort,
            state_clients=round_lib.num_clients_of(state.client_params))
        weights = cfg.weights(n)
        if cfg.train_all_clients and not cohort.full:
            # Every client trains (with the key it has as a cohort member); the
            # server averages the cohort's local copies only.
            weights = jnp.zeros((train.num_clients,), jnp.float32).at[cohort.ids].set(weights)
            cohort, data, keys, n = round_lib.start(key, train, None)
        (theta, losses), (delta_sum, weight_sum) = ex.map_reduce(
            client_update, (state.params, state.hparams),
            (cohort.take(state.client_params), data, keys, weights), cfg.strategy)
        params = jax.tree.map(lambda w, d: w + state.hparams["beta"] * d, state.params,
                              aggregation.safe_div(delta_sum, weight_sum))
        metrics = {"train_loss": round_lib.mean_loss(losses, n)}
        return state.replace(round=state.round + 1, params=params,
                             client_params=cohort.put(state.client_params, theta)), metrics

    def evaluate(state, train, test):
        return server.evaluate_personal(model, state.client_params, test, cfg.strategy)

    return FederatedAlgorithm(init, round_fn, evaluate)
