"""pFedMe: personalized FL with Moreau envelopes.

Reference:
  Dinh, Tran, Nguyen, "Personalized Federated Learning with Moreau Envelopes",
  NeurIPS 2020 (arXiv 2006.08848), Algorithm 1; code github.com/CharlieDinh/pFedMe.

Client i keeps a local copy w_i of the global model and a personal model
theta_i. Each of its R local steps draws a minibatch D and
  1. approximately solves
     theta = argmin f_i(theta; D) + lambda/2 ||theta - w_i||^2 + mu/2 ||theta||^2
     by K gradient steps
     theta <- theta - eta_p (grad f_i(theta; D) + lambda (theta - w_i) + mu theta),
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
    EVERY client each round, then samples S of them and aggregates only their
    local copies (weighted by n_i over the sampled ones, then mixed with beta),
    so every client's personal model is refreshed every round.
    `train_all_clients=True` (static) does that: all M clients train with
    their usual keys, their personal models are all updated (clients outside
    the cohort are NOT unchanged, by design), and the cohort - sampled or
    given, the same ids as in the default mode - is what the server averages.
    The cohort's clients compute exactly what they compute in the default
    mode, so the global model is the same in both modes; only the personal
    models of the other clients (and the train loss, the n_i-weighted mean
    over every client that trained) differ. It costs M clients' compute per
    round instead of S.
  * mu. The code's personal solver (FLAlgorithms/optimizers/fedoptimizer.py,
    `pFedMeOptimizer`, default mu = 0.001, not overridden by the client) adds
    mu theta to the gradient of the sub-problem: an L2 penalty mu/2 ||theta||^2
    on theta only, not on the local copy's update. The paper has no such term.
    `mu` (traced; default 0, the paper) sets it; the code's value is 0.001.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from flax import struct

from fedjax_pfl.core import aggregation, algorithm, local
from fedjax_pfl.core import execution as ex
from fedjax_pfl.core import round as round_lib
from fedjax_pfl.core.algorithm import FederatedAlgorithm
from fedjax_pfl.data.client_data import client_capacity, client_rows
from fedjax_pfl.models.model import Model

WEIGHTINGS = ("num_examples", "uniform")


@struct.dataclass
class PFedMeState:
    """Attributes:
      round: int32 scalar, rounds completed.
      params: the global model w.
      client_params: every client's personal model theta_i, leaves [M, ...].
      hparams: traced scalars: client_lr (eta), personal_lr (eta_p), lam, beta, mu.
    """

    round: jax.Array
    params: object
    client_params: object
    hparams: dict


def pfedme(
    model: Model,
    *,
    lam: float = 15.0,
    inner_steps: int = 5,
    personal_lr: float = 0.1,
    client_lr: float = 0.005,
    beta: float = 1.0,
    mu: float = 0.0,
    train_all_clients: bool = False,
    clients_per_round: int | None = None,
    batch_size: int = 20,
    local_steps: int | None = 20,
    local_epochs: int | None = None,
    weighting: str = "num_examples",
    execution: str | ex.Execution = "vmap",
) -> FederatedAlgorithm:
    """pFedMe (see the module docstring for the symbols).

    Args:
      model: the model.
      lam: lambda, the Moreau-envelope coefficient (traced).
      inner_steps: K, gradient steps of the personal sub-problem (static).
      personal_lr: eta_p, step of the personal sub-problem (traced).
      client_lr: eta, step of the local copy (traced).
      beta: server mixing (traced; 1 = plain average).
      mu: L2 coefficient on theta in the personal sub-problem (traced; 0: the
        paper; the released code uses 0.001).
      train_all_clients: every client trains each round and the server
        averages only the cohort's local copies (static; False: only the
        cohort trains, the paper; True: the released code).
      clients_per_round: S (None: all clients).
      batch_size, local_steps, local_epochs: the R-step schedule (epoch mode
        masks empty steps like `local.batch_plan`).
      weighting: "num_examples" (code) or "uniform" (paper).
      execution: client-axis strategy.
    """
    algorithm.check_cohort_size(clients_per_round)
    for name, value in (("lam", lam), ("personal_lr", personal_lr), ("client_lr", client_lr),
                        ("beta", beta), ("mu", mu)):
        algorithm.check_number(name, value)
    algorithm.check_arg("train_all_clients", train_all_clients,
                        isinstance(train_all_clients, bool), "a bool")
    algorithm.check_arg("inner_steps", inner_steps, isinstance(inner_steps, int)
                        and not isinstance(inner_steps, bool) and inner_steps >= 1, "an int >= 1")
    algorithm.check_arg("weighting", weighting, weighting in WEIGHTINGS, f"one of {WEIGHTINGS}")
    schedule = local.LocalSchedule(batch_size, local_steps, local_epochs)
    execution = ex.as_execution(execution)
    loss_fn = local.model_loss_fn(model)

    def init(key, train, params=None):
        algorithm.check_data(model, train, clients_per_round)
        params = algorithm.initial_params(model, key, params)
        stacked = round_lib.replicate(params, train.num_clients)
        hp = algorithm.hparams(client_lr=client_lr, personal_lr=personal_lr, lam=lam, beta=beta,
                               mu=mu)
        return PFedMeState(jnp.zeros((), jnp.int32), params, stacked, hp)

    def client_update(broadcast, x):
        params, hp = broadcast
        personal, data, key, weight = x
        idx, weights = local.batch_plan(key, data.num_examples, client_capacity(data),
                                        batch_size=batch_size,
                                        local_steps=schedule.local_steps,
                                        local_epochs=schedule.epochs)

        def step(carry, xs):
            w_local, theta = carry
            i, w = xs
            batch = client_rows(data, i)
            data_loss = lambda p: jnp.sum(w * loss_fn(p, batch, None))

            def inner(th, _):
                g = jax.grad(data_loss)(th)
                return jax.tree.map(lambda t, gt, wl: t - hp["personal_lr"] * (
                    gt + hp["lam"] * (t - wl) + hp["mu"] * t), th, g, w_local), None

            theta_new = jax.lax.scan(inner, theta, None, length=inner_steps)[0]
            w_new = jax.tree.map(lambda wl, t: wl - hp["client_lr"] * hp["lam"] * (wl - t),
                                 w_local, theta_new)
            count = jnp.sum(w > 0).astype(jnp.float32)
            new = optax.tree.where(count > 0, (w_new, theta_new), (w_local, theta))
            return new, (data_loss(theta_new), count)

        (w_local, theta), (losses, counts) = jax.lax.scan(step, (params, params), (idx, weights))
        # A client that never stepped keeps its stored personal model.
        theta = optax.tree.where(jnp.sum(counts) > 0, theta, personal)
        loss = jnp.sum(losses * counts) / jnp.maximum(jnp.sum(counts), 1.0)
        return (theta, loss), aggregation.weighted_delta(w_local, params, weight)

    def round_fn(state, train, key, cohort=None):
        cohort, data, keys, n = round_lib.start(
            key, train, clients_per_round, cohort,
            state_clients=round_lib.num_clients_of(state.client_params))
        weights = n if weighting == "num_examples" else (n > 0).astype(jnp.float32)
        if train_all_clients and not cohort.full:
            # Every client trains (with the key it has as a cohort member); the
            # server averages the cohort's local copies only.
            weights = jnp.zeros((train.num_clients,), jnp.float32).at[cohort.ids].set(weights)
            cohort, data, keys, n = round_lib.start(key, train, None)
        (theta, losses), (delta_sum, weight_sum) = ex.map_reduce(
            client_update, (state.params, state.hparams),
            (cohort.take(state.client_params), data, keys, weights), execution)
        mean_delta = aggregation.safe_div(delta_sum, weight_sum)
        beta_ = state.hparams["beta"]
        params = jax.tree.map(lambda w, d: w + beta_ * d, state.params, mean_delta)
        metrics = {"train_loss": round_lib.mean_loss(losses, n)}
        return state.replace(round=state.round + 1, params=params,
                             client_params=cohort.put(state.client_params, theta)), metrics

    def evaluate(state, train, test):
        del train
        return ex.map_clients(lambda _, x: local.evaluate_client(model, *x), (),
                              (state.client_params, test), execution)

    return FederatedAlgorithm(init, round_fn, evaluate)
