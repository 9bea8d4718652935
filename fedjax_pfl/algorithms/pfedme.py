"""pFedMe: personalized FL with Moreau envelopes.

Reference:
  Dinh, Tran, Nguyen, "Personalized Federated Learning with Moreau Envelopes",
  NeurIPS 2020 (arXiv 2006.08848), Algorithm 1; code github.com/CharlieDinh/pFedMe.

Client i keeps a local copy w_i of the global model and a personal model
theta_i. Each of its R local steps draws a minibatch D and
  1. approximately solves theta = argmin f_i(theta; D) + lambda/2 ||theta - w_i||^2
     by K gradient steps theta <- theta - eta_p (grad f_i(theta; D) + lambda (theta - w_i)),
  2. moves the local copy: w_i <- w_i - eta lambda (w_i - theta).
Both start at the global w each round (as in the code, where theta carries over
between the R steps). The server sets w <- (1 - beta) w + beta sum_i p_i w_i.
Evaluation tests each client's last personal model theta_i (stacked [M, ...];
clients never sampled keep the initial model).

Paper symbol -> argument: lambda -> `lam`, K -> `inner_steps`, eta_p (the
inner solver's step, code `personal_learning_rate`) -> `personal_lr`, eta ->
`client_lr`, beta -> `beta`, R -> `local_steps`, |D| -> `batch_size`, S ->
`clients_per_round`. Defaults are the code's MNIST ones (lambda 15, K 5,
eta_p 0.1, eta 0.005, beta 1, R 20, |D| 20). The code averages the local copies
weighted by n_i (default); the paper's 1/S mean is `weighting="uniform"`. The
code also trains every client each round and aggregates only the sampled ones;
here only the cohort trains (the paper's reading, and clients outside the cohort
stay bit-identical).
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
      hparams: traced scalars: client_lr (eta), personal_lr (eta_p), lam, beta.
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
      clients_per_round: S (None: all clients).
      batch_size, local_steps, local_epochs: the R-step schedule (epoch mode
        masks empty steps like `local.batch_plan`).
      weighting: "num_examples" (code) or "uniform" (paper).
      execution: client-axis strategy.
    """
    algorithm.check_cohort_size(clients_per_round)
    for name, value in (("lam", lam), ("personal_lr", personal_lr), ("client_lr", client_lr),
                        ("beta", beta)):
        algorithm.check_number(name, value)
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
        hp = algorithm.hparams(client_lr=client_lr, personal_lr=personal_lr, lam=lam, beta=beta)
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
                    gt + hp["lam"] * (t - wl)), th, g, w_local), None

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
