"""FedFew: K shared models serve M clients through smooth Tchebycheff-set weights.

Reference:
  Guo et al., "Few-for-Many Personalized Federated Learning", CVPR 2026,
  arXiv 2603.11992; released code github.com/pgg3/FedFew (class `FedFewS`).

Every cohort client trains EVERY one of the K server models (each with its own
minibatch order, keys `fold_in(client_key, k)`) and reports the K losses
L_ik. With n̄_i = n_i / sum_{j in S} n_j and x_ik = n̄_i L_ik the server forms

  w_ik = softmax_k(-x_ik / mu),  alpha_i = softmax_{i in S}(-logsumexp_k(-x_ik / mu))

(both in log space, so mu = 1e-3 with losses of 1e3 stays finite) and moves
theta_k <- theta_k + sum_i alpha_i w_ik (theta_ik - theta_k): no per-model
renormalisation, server lr 1 (`server_optimizer` acts on the pseudo-gradient).
Clients with no examples get alpha_i = 0.

Paper symbol -> argument: K -> `num_models`, mu -> `mu`, E -> `local_epochs`,
B -> `batch_size`, eta -> `client_lr`. Where the paper and the code differ the
default follows the code:
  * `loss_at="last_epoch"` (code): L_ik is the mean training minibatch loss of
    the copy during its last local epoch (all T steps in step mode);
    `"received"` (paper's L_i(theta_k)): the loss of the received model on the
    client's training data.
  * `init="shared"` (code): the K models start as copies of one init, and only
    the per-model minibatch orders break the symmetry;
    `per_model_orders=False` gives every copy the same order, and then identical
    copies stay identical forever (kept to test exactly that). `"independent"`:
    K independent inits.

Evaluation (`eval_protocol`): client i uses the model with the lowest training
loss, k_i* = argmin_k mean CE on its training data, and is tested with it.
  * `"server"` (default for comparisons): the K current server models.
  * `"local"` (how the published numbers were measured): the K copies the
    client trained in the last round, before aggregation (clients outside
    that cohort use the received, untrained models). Instead of keeping
    O(M K d) copies in the state, the state keeps the K models the last round
    started from and its key, and `evaluate` re-runs that round's local
    training: deterministic, O(K d) memory, K trainings per client per
    evaluation. Before any round it equals `"server"` (it reads `params`).
The chosen model is returned per client as `model` [M].

Memory: O(K d) per round, not O(S K d). The weights factor as
alpha_i w_ik = e^{-x_ik/mu} / (S_i^2 sum_j 1/S_j), S_i = sum_k e^{-x_ik/mu}:
each client knows its own log-weight a_i = log(1/S_i) (-inf without data) and
w_ik once it has trained (n̄_i only needs the cohort's n_j, known in advance),
and only the normaliser sum_j e^{a_j} is global. The update is therefore
streamed through `map_reduce` with `reductions.LOG_WEIGHTED_SUM` (online
max-rescaling, as in flash attention): chunk by chunk under "chunked", then
across devices under "sharded", never stacking the deltas over clients. The
per-client losses (O(S K) scalars) are still kept for the metrics.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct

from fedjax_pfl.core import aggregation, algorithm, local, reductions, sampling
from fedjax_pfl.core import execution as ex
from fedjax_pfl.core import round as round_lib
from fedjax_pfl.core.algorithm import FederatedAlgorithm
from fedjax_pfl.core.kmodels import evaluate_best, train_losses
from fedjax_pfl.models.model import Model

LOSS_AT = ("last_epoch", "received")
INITS = ("shared", "independent")
PROTOCOLS = ("server", "local")


@struct.dataclass
class FedFewState:
    """State of FedFew.

    Attributes:
      round: int32 scalar, rounds completed.
      params: the K server models, leaves [K, ...].
      opt_state: the server optimizer's state (over the [K, ...] stack).
      last_params: the K models the last round started from, leaves [K, ...]
        (for the `"local"` evaluation protocol).
      last_key: uint32 key data of the last round's key (same use).
      last_cohort: [M] bool, the last round's cohort (same use).
      hparams: traced scalars: client_lr, server_lr, mu.
    """

    round: jax.Array
    params: object
    opt_state: object
    last_params: object
    last_key: jax.Array
    last_cohort: jax.Array
    hparams: dict


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
    `per_model_orders`); the losses are L_ik as `loss_at` says.
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


def _key_data(key):
    if jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
        return jax.random.key_data(key)
    return key.astype(jnp.uint32)


def fedfew(
    model: Model,
    *,
    num_models: int = 3,
    mu: float = 0.01,
    clients_per_round: int | None = None,
    batch_size: int = 32,
    local_steps: int | None = None,
    local_epochs: int | None = None,
    client_optimizer: local.OptimizerSpec = "sgd",
    client_lr: float = 0.05,
    server_optimizer: local.OptimizerSpec = "sgd",
    server_lr: float = 1.0,
    loss_at: str = "last_epoch",
    init: str = "shared",
    per_model_orders: bool = True,
    eval_protocol: str = "server",
    execution: str | ex.Execution = "vmap",
    diagnostics: bool = False,
) -> FederatedAlgorithm:
    """FedFew (FedFewS of the released code).

    Args:
      model: the model.
      num_models: K, the number of server models.
      mu: the smoothing temperature (traced; `hparams["mu"]`).
      clients_per_round: S, sampled without replacement each round (None: all).
      batch_size, local_steps, local_epochs: local schedule (default 1 epoch).
      client_optimizer, client_lr: the client optimizer and its lr (traced).
      server_optimizer, server_lr: server optimizer on the pseudo-gradient
        (default plain SGD with lr 1: the code's update).
      loss_at: "last_epoch" or "received" (see the module docstring).
      init: "shared" or "independent" initialisation of the K models.
      per_model_orders: each copy draws its own minibatch order.
      eval_protocol: "server" or "local".
      execution: client-axis strategy.
      diagnostics: add each round's per-client quantities to the metrics
        (`metrics["diagnostics"]`: "clients" [S], "losses" L_ik [S, K],
        "w" w_ik [S, K], "alpha" alpha_i [S], "model" argmin_k L_ik [S]).
    """
    algorithm.check_arg("num_models", num_models, isinstance(num_models, int)
                        and not isinstance(num_models, bool) and num_models >= 1, "an int >= 1")
    algorithm.check_number("mu", mu, strict=True)
    algorithm.check_cohort_size(clients_per_round)
    algorithm.check_number("client_lr", client_lr)
    algorithm.check_number("server_lr", server_lr)
    algorithm.check_arg("loss_at", loss_at, loss_at in LOSS_AT, f"one of {LOSS_AT}")
    algorithm.check_arg("init", init, init in INITS, f"one of {INITS}")
    algorithm.check_arg("per_model_orders", per_model_orders, isinstance(per_model_orders, bool),
                        "a bool")
    algorithm.check_arg("eval_protocol", eval_protocol, eval_protocol in PROTOCOLS,
                        f"one of {PROTOCOLS}")
    local.check_optimizer("server_optimizer", server_optimizer)
    algorithm.check_arg("diagnostics", diagnostics, isinstance(diagnostics, bool), "a bool")
    schedule = local.LocalSchedule(batch_size, local_steps, local_epochs, client_optimizer)
    execution = ex.as_execution(execution)
    train_all = client_trainer(model, num_models, schedule, per_model_orders, loss_at)

    def init_fn(key, train, params=None):
        algorithm.check_data(model, train, clients_per_round)
        params = algorithm.initial_params(model, key, params, num_models=num_models,
                                          independent=init == "independent")
        hp = algorithm.hparams(client_lr=client_lr, server_lr=server_lr, mu=mu)
        opt_state = local.make_optimizer(server_optimizer, hp["server_lr"]).init(params)
        # last_params is its own copy: a donated state must not hold one buffer twice.
        return FedFewState(jnp.zeros((), jnp.int32), params, opt_state,
                           jax.tree.map(jnp.copy, params), _key_data(key),
                           jnp.zeros((train.num_clients,), bool), hp)

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

    def round_fn(state, train, key, cohort=None):
        cohort, data, keys, n = round_lib.start(key, train, clients_per_round, cohort,
                                                state_clients=state.last_cohort.shape[0])
        broadcast = (state.params, state.hparams, jnp.sum(n))
        losses, total = ex.map_reduce(client_update, broadcast, (data, keys), execution,
                                      reductions.LOG_WEIGHTED_SUM)
        mean_delta = reductions.log_weighted_mean(total)
        server_opt = local.make_optimizer(server_optimizer, state.hparams["server_lr"])
        params, opt_state = aggregation.server_update(server_opt, state.params, state.opt_state,
                                                      mean_delta)
        metrics = {"train_loss": round_lib.mean_loss(jnp.min(losses, axis=1), n)}
        if diagnostics:
            w, alpha = stch_weights(losses, data.num_examples, state.hparams["mu"])
            metrics["diagnostics"] = {"clients": cohort.ids, "losses": losses, "w": w,
                                      "alpha": alpha, "model": jnp.argmin(losses, axis=1)}
        in_cohort = cohort.put(jnp.zeros_like(state.last_cohort), jnp.ones(cohort.ids.shape, bool))
        return state.replace(round=state.round + 1, params=params, opt_state=opt_state,
                             last_params=state.params, last_key=_key_data(key),
                             last_cohort=in_cohort), metrics

    def evaluate_client(broadcast, x):
        params, last_params, hp, trained_round = broadcast
        train_row, test_row, key, in_cohort = x
        if eval_protocol == "local":
            # The copies this client trained last round; the received models if it
            # was not in that cohort; the current models before any round.
            trained, _ = train_all(last_params, train_row, key, hp["client_lr"])
            received = jax.tree.map(lambda a, b: jnp.where(trained_round, a, b), last_params,
                                    params)
            params = jax.tree.map(lambda t, p: jnp.where(trained_round & in_cohort, t, p),
                                  trained, received)
        return evaluate_best(model, params, train_row, test_row)

    def evaluate(state, train, test):
        algorithm.check_same_clients(train.num_clients, test, "test")
        m = train.num_clients
        _, client_key = sampling.round_keys(jax.random.wrap_key_data(state.last_key))
        keys = sampling.client_keys(client_key, jnp.arange(m))
        broadcast = (state.params, state.last_params, state.hparams, state.round > 0)
        return ex.map_clients(evaluate_client, broadcast, (train, test, keys, state.last_cohort),
                              execution)

    return FederatedAlgorithm(init_fn, round_fn, evaluate)
