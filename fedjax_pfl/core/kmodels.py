"""The family of algorithms with K server models (IFCA, HypCluster, FedEM, CFL, FedFew).

Shared here: the config (`KModelsConfig`) and state (`KModelsState`) they
extend, the per-model losses and best-of-K evaluation, the hard-assignment
round (each client trains the model it chose; each model is averaged over the
clients that chose it), the server step over the [K, ...] stack, and FedFew's
smooth Tchebycheff-set weights and K-copy client trainer.
"""


import dataclasses

import jax
import jax.numpy as jnp
from flax import struct

from fedjax_pfl.core import aggregation, algorithm, config, local, reductions, server
from fedjax_pfl.core import execution as ex
from fedjax_pfl.core import round as round_lib
from fedjax_pfl.models.model import Model

INITS = ("independent", "shared")


@dataclasses.dataclass(frozen=True, kw_only=True)
class KModelsConfig(config.ServerConfig):
    """`config.ServerConfig` plus the K server models (the server step acts on each):

    Attributes:
      num_models: K, the number of server models.
      init: "independent" (K random inits) or "shared" (K copies of one init).
    """

    num_models: int = config.integer(3)
    init: str = config.choice("independent", INITS)


@struct.dataclass
class KModelsState:
    """State of a K-model algorithm (subclasses add their per-client leaves).

    Attributes:
      round: int32 scalar, rounds completed.
      params: the K server models, leaves [K, ...].
      opt_state: the server optimizer's state (over the [K, ...] stack).
      hparams: traced scalars (client_lr, server_lr and the algorithm's own).
    """

    round: jax.Array
    params: object
    opt_state: object
    hparams: dict


def init_state(state_cls, model: Model, cfg, key, train, params=None, **extra):
    """`state_cls` at round 0: K models per `cfg.num_models` / `cfg.init`, and `extra` leaves."""
    params, hp, opt_state = server.init(model, cfg, key, train, params)
    return state_cls(round=jnp.zeros((), jnp.int32), params=params, opt_state=opt_state,
                     hparams=hp, **extra)


def per_model_mean(delta_sum, weight_sum):
    """sum_i p_ik delta_ik / sum_i p_ik for each model k (0 where no weight)."""
    return jax.tree.map(
        lambda d: aggregation.safe_div(d, weight_sum.reshape((-1,) + (1,) * (d.ndim - 1))),
        delta_sum)


def train_losses(model: Model, params, data) -> jax.Array:
    """[K] mean loss of each of the stacked models on ONE client's data (eval mode)."""
    stats = jax.vmap(lambda p: local.evaluate_client(model, p, data))(params)
    return stats["loss_sum"] / jnp.maximum(stats["num_examples"], 1.0)


def evaluate_best(model: Model, params, train_row, test_row) -> dict[str, jax.Array]:
    """ONE client's test statistics with the model of lowest training loss, and the
    choice as `model` (float32)."""
    choice = jnp.argmin(train_losses(model, params, train_row))
    chosen = jax.tree.map(lambda a: a[choice], params)
    return {**local.evaluate_client(model, chosen, test_row), "model": choice.astype(jnp.float32)}


def evaluate_best_of(model: Model, params, train, test, execution: ex.Execution):
    """Per-client [M] `evaluate_best` of the K stacked models `params`."""
    algorithm.check_same_clients(train.num_clients, test, "test")
    return ex.map_clients(lambda p, x: evaluate_best(model, p, *x), params, (train, test),
                          execution)


def hard_assignment_round(model: Model, cfg):
    """The round of IFCA / HypCluster: each cohort client picks k_i = argmin_k L_i(theta_k)
    on its training data, trains theta_{k_i} (with its client key) and each model moves
    to the `cfg.weights`-weighted mean of its choosers' updates (unchanged if none).

    Returns `round(state, train, key, cohort=None, state_clients=None) -> (state,
    metrics, (cohort, n, choices [S] int32))`.
    """
    loss_fn = local.model_loss_fn(model)

    def client_update(broadcast, x):
        params, hp = broadcast
        data, key, weight = x
        choice = jnp.argmin(train_losses(model, params, data)).astype(jnp.int32)
        start = jax.tree.map(lambda a: a[choice], params)
        result = cfg.schedule.train(loss_fn, start, data, key, hp["client_lr"])
        one_hot = jax.nn.one_hot(choice, cfg.num_models, dtype=jnp.float32) * weight
        delta = jax.tree.map(lambda c, s: jnp.einsum("k,...->k...", one_hot, c - s),
                             result.params, start)
        return (result.mean_loss(), choice), (delta, one_hot)

    def round_fn(state, train, key, cohort=None, state_clients=None):
        cohort, data, keys, n = round_lib.start(key, train, cfg.clients_per_round, cohort,
                                                state_clients=state_clients)
        (losses, choices), (delta_sum, weight_sum) = ex.map_reduce(
            client_update, (state.params, state.hparams), (data, keys, cfg.weights(n)),
            cfg.strategy)
        params, opt_state = server.step_on(cfg, state, per_model_mean(delta_sum, weight_sum))
        metrics = {"train_loss": round_lib.mean_loss(losses, n)}
        state = state.replace(round=state.round + 1, params=params, opt_state=opt_state)
        return state, metrics, (cohort, n, choices)

    return round_fn


# ---------------------------------------------------------------------------- FedFew


def client_weights(losses, n_bar, mu):
    """One client's part of the Smooth Tchebycheff-set weights, in log space.

    Args:
      losses: [K] L_ik.
      n_bar: n_i / sum_{j in S} n_j.
      mu: the smoothing temperature.

    Returns:
      (w [K] = softmax_k(-x_ik / mu), a_i = log(1 / S_i) = -logsumexp_k(-x_ik / mu));
      alpha_i = softmax_{i in S}(a_i) over the clients with data.
    """
    # Shift by the client's best loss before scaling: the logits reach 1e5-1e6 for
    # mu = 1e-3, where float32 keeps no digits after the point, but the shifted
    # ones that matter (within ~100 of 0) keep full relative precision.
    best = jnp.min(losses)
    shifted = -(n_bar * (losses - best)) / mu
    return jax.nn.softmax(shifted), n_bar * best / mu - jax.nn.logsumexp(shifted)


def stch_weights(losses, num_examples, mu):
    """Smooth Tchebycheff-set weights of one round, in log space.

    Args:
      losses: [S, K] L_ik.
      num_examples: [S] n_i (clients with 0 get alpha_i = 0).
      mu: the smoothing temperature.

    Returns:
      (w [S, K], rows summing to 1; alpha [S], summing to 1 over clients with data).
    """
    n = num_examples.astype(jnp.float32)
    valid = n > 0
    n_bar = n / jnp.maximum(jnp.sum(n), 1.0)
    w, neg_log_s = jax.vmap(client_weights, in_axes=(0, 0, None))(losses, n_bar, mu)
    alpha = jax.nn.softmax(jnp.where(valid, neg_log_s, -jnp.inf))
    alpha = jnp.where(valid, alpha, 0.0)
    return w, alpha


def client_trainer(model: Model, num_models: int, schedule: local.LocalSchedule,
                   per_model_orders: bool, loss_at: str):
    """`train(params [K, ...], data, key, lr) -> (trained [K, ...], losses [K])` of one client.

    Copy k uses the key `fold_in(key, k)` (`key` itself without
    `per_model_orders`); the losses are L_ik as `loss_at` says ("last_epoch":
    the copy's mean minibatch loss in its last local epoch, all steps in step
    mode; "received": `train_losses` of the received models).
    """
    loss_fn = local.model_loss_fn(model)

    def train(params, data, key, lr):
        keys = jax.vmap(lambda k: jax.random.fold_in(key, k))(jnp.arange(num_models))
        if not per_model_orders:
            keys = jnp.broadcast_to(key, (num_models,))
        result = jax.vmap(lambda p, k: schedule.train(loss_fn, p, data, k, lr))(params, keys)
        epochs = schedule.epochs
        last = None if epochs is None else result.losses.shape[1] // epochs
        losses = jax.vmap(lambda r: r.mean_loss(last))(result)
        if loss_at == "received":
            losses = train_losses(model, params, data)
        return result.params, losses

    return train


def stch_round(cfg, train_all):
    """FedFew's streamed round: theta_k <- theta_k + sum_i alpha_i w_ik (theta_ik - theta_k)
    through `map_reduce` with `reductions.LOG_WEIGHTED_SUM` (O(K d) memory), the clients
    training with `train_all` (`client_trainer`).

    Returns `round(state, train, key, cohort=None, state_clients=None) -> (state,
    metrics, (cohort, data, losses [S, K]))`.
    """

    def client_update(broadcast, x):
        params, hp, total_n = broadcast
        data, key = x
        trained, losses = train_all(params, data, key, hp["client_lr"])
        n = data.num_examples.astype(jnp.float32)
        w, log_weight = client_weights(losses, n / jnp.maximum(total_n, 1.0), hp["mu"])
        # alpha_i w_ik (theta_ik - theta_k) = softmax_i(a_i) * [w_ik (theta_ik - theta_k)]
        weighted = jax.tree.map(lambda t, p: w.reshape((-1,) + (1,) * (t.ndim - 1)) * (t - p),
                                trained, params)
        term = reductions.log_weighted_term(jnp.where(n > 0, log_weight, -jnp.inf), weighted)
        return losses, term

    def round_fn(state, train, key, cohort=None, state_clients=None):
        cohort, data, keys, n = round_lib.start(key, train, cfg.clients_per_round, cohort,
                                                state_clients=state_clients)
        broadcast = (state.params, state.hparams, jnp.sum(n))
        losses, total = ex.map_reduce(client_update, broadcast, (data, keys), cfg.strategy,
                                      reductions.LOG_WEIGHTED_SUM)
        params, opt_state = server.step_on(cfg, state, reductions.log_weighted_mean(total))
        metrics = {"train_loss": round_lib.mean_loss(jnp.min(losses, axis=1), n)}
        state = state.replace(round=state.round + 1, params=params, opt_state=opt_state)
        return state, metrics, (cohort, data, losses)

    return round_fn


def evaluate_trained(model: Model, train_all, local_protocol: bool):
    """FedFew's `evaluate_client((params, last_params, hp, trained_round), (train_row,
    test_row, key, in_cohort))`: `evaluate_best` among the K current models, or, under
    the "local" protocol, the copies the client trained last round (re-trained from
    `last_params` with `train_all` and the round's client `key`), the received models
    if it was not in that cohort, the current models before any round."""

    def evaluate_client(broadcast, x):
        params, last_params, hp, trained_round = broadcast
        train_row, test_row, key, in_cohort = x
        if local_protocol:
            trained, _ = train_all(last_params, train_row, key, hp["client_lr"])
            received = jax.tree.map(lambda a, b: jnp.where(trained_round, a, b), last_params,
                                    params)
            params = jax.tree.map(lambda t, p: jnp.where(trained_round & in_cohort, t, p),
                                  trained, received)
        return evaluate_best(model, params, train_row, test_row)

    return evaluate_client


def key_data(key) -> jax.Array:
    """uint32 key data of a typed or raw PRNG key (to keep in a state)."""
    if jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
        return jax.random.key_data(key)
    return key.astype(jnp.uint32)
