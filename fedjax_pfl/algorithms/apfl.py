"""APFL: Adaptive Personalized Federated Learning (a learned local/global mixture).

Reference:
  Deng, Kamani, Mahdavi, "Adaptive Personalized Federated Learning",
  arXiv 2003.13461 (2020), Algorithm 1.

Client i keeps a local model v_i and a mixing weight alpha_i in [0, 1]; its
personalized model is v̄_i = alpha_i v_i + (1 - alpha_i) w. In a round each
cohort client starts a copy w_i of the global model and, on the SAME minibatch
xi at every local step,
  w_i     <- w_i - eta grad f_i(w_i; xi)
  v_i     <- v_i - eta grad_v f_i(alpha_i v_i + (1 - alpha_i) w_i; xi)
  alpha_i <- clip(alpha_i - eta_alpha <v_i - w_i, grad f_i(v̄_i; xi)>, 0, 1)
(all three gradients at the step's starting point). The server averages the
w_i (n_i-weighted); v_i and alpha_i are stacked [M, ...] in the state.
Evaluation tests v̄_i = alpha_i v_i + (1 - alpha_i) w with the current global w.

Paper symbol -> argument: alpha_i (initial) -> `alpha`, eta -> `client_lr`
(w and v share the client optimizer), eta_alpha -> `alpha_lr` (0: fixed
alpha, the paper's non-adaptive variant), E/B -> `local_epochs`/`batch_size`.
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


@struct.dataclass
class APFLState:
    """State of APFL.

    Attributes:
      round: int32 scalar, rounds completed.
      params: the global model w.
      opt_state: the server optimizer's state.
      client_params: every client's local model v_i, leaves [M, ...].
      client_alpha: [M] every client's mixing weight alpha_i.
      hparams: traced scalars: client_lr, server_lr, alpha_lr.
    """

    round: jax.Array
    params: object
    opt_state: object
    client_params: object
    client_alpha: jax.Array
    hparams: dict


def mix(alpha, local_params, global_params):
    """alpha v + (1 - alpha) w, leaf by leaf."""
    return jax.tree.map(lambda v, w: alpha * v + (1.0 - alpha) * w, local_params, global_params)


def apfl(
    model: Model,
    *,
    alpha: float = 0.5,
    alpha_lr: float | None = None,
    clients_per_round: int | None = None,
    batch_size: int = 32,
    local_steps: int | None = None,
    local_epochs: int | None = None,
    client_optimizer: local.OptimizerSpec = "sgd",
    client_lr: float = 0.05,
    server_optimizer: local.OptimizerSpec = "sgd",
    server_lr: float = 1.0,
    execution: str | ex.Execution = "vmap",
    diagnostics: bool = False,
) -> FederatedAlgorithm:
    """APFL.

    Args:
      model: the model.
      alpha: every client's initial mixing weight, in [0, 1].
      alpha_lr: step size of the alpha update (traced; None: `client_lr`; 0: fixed).
      clients_per_round: S, sampled without replacement each round (None: all).
      batch_size, local_steps, local_epochs: local schedule (default 1 epoch).
      client_optimizer, client_lr: the optimizer of (w_i, v_i) and its lr.
      server_optimizer, server_lr: server optimizer on the pseudo-gradient.
      execution: client-axis strategy.
      diagnostics: add each round's alpha_i of the cohort to the metrics
        (`metrics["diagnostics"]`: "clients" [S], "alpha" [S]).
    """
    algorithm.check_arg("alpha", alpha, isinstance(alpha, (int, float))
                        and not isinstance(alpha, bool) and 0.0 <= alpha <= 1.0,
                        "a number in [0, 1]")
    if alpha_lr is not None:
        algorithm.check_number("alpha_lr", alpha_lr)
    algorithm.check_cohort_size(clients_per_round)
    algorithm.check_number("client_lr", client_lr)
    algorithm.check_number("server_lr", server_lr)
    local.check_optimizer("server_optimizer", server_optimizer)
    schedule = local.LocalSchedule(batch_size, local_steps, local_epochs, client_optimizer)
    algorithm.check_arg("diagnostics", diagnostics, isinstance(diagnostics, bool), "a bool")
    execution = ex.as_execution(execution)

    def init(key, train, params=None):
        algorithm.check_data(model, train, clients_per_round)
        params = algorithm.initial_params(model, key, params)
        m = train.num_clients
        personal = round_lib.replicate(params, m)
        hp = algorithm.hparams(client_lr=client_lr, server_lr=server_lr,
                               alpha_lr=client_lr if alpha_lr is None else alpha_lr)
        opt_state = local.make_optimizer(server_optimizer, hp["server_lr"]).init(params)
        return APFLState(jnp.zeros((), jnp.int32), params, opt_state, personal,
                         jnp.full((m,), alpha, jnp.float32), hp)

    def client_train(params, personal, a, data, key, hp):
        """The joint local loop of ONE client: (w_i, v_i, alpha_i, [T] losses, [T] counts)."""
        plan_key, step_key = jax.random.split(key)
        idx, weights = local.batch_plan(plan_key, data.num_examples, client_capacity(data),
                                        batch_size=schedule.batch_size,
                                        local_steps=schedule.local_steps,
                                        local_epochs=schedule.epochs)
        optimizer = local.make_optimizer(schedule.optimizer, hp["client_lr"])

        def step(carry, xs):
            w, v, a, opt_state = carry
            i, bw, k = xs
            batch = client_rows(data, i)
            loss = lambda p: jnp.sum(bw * model.loss(model.apply(p, batch, k), batch))
            data_loss, grad_w = jax.value_and_grad(loss)(w)
            grad_mix = jax.grad(loss)(mix(a, v, w))
            grad_v = jax.tree.map(lambda g: a * g, grad_mix)
            grad_a = optax.tree.vdot(optax.tree.sub(v, w), grad_mix)
            updates, new_opt_state = optimizer.update((grad_w, grad_v), opt_state, (w, v))
            new_w, new_v = optax.apply_updates((w, v), updates)
            new_a = jnp.clip(a - hp["alpha_lr"] * grad_a, 0.0, 1.0)
            count = jnp.sum(bw > 0).astype(jnp.float32)
            new = optax.tree.where(count > 0, (new_w, new_v, new_a, new_opt_state),
                                   (w, v, a, opt_state))
            return new, (data_loss, count)

        keys = jax.random.split(step_key, idx.shape[0])
        start = (params, personal, a, optimizer.init((params, personal)))
        (w, v, a, _), (losses, counts) = jax.lax.scan(step, start, (idx, weights, keys))
        return w, v, a, local.LocalResult(w, losses, counts).mean_loss()

    def client_update(broadcast, x):
        params, hp = broadcast
        data, key, weight, personal, a = x
        w, v, a, loss = client_train(params, personal, a, data, key, hp)
        return (loss, v, a), aggregation.weighted_delta(w, params, weight)

    def round_fn(state, train, key, cohort=None):
        cohort, data, keys, n = round_lib.start(key, train, clients_per_round, cohort,
                                                state_clients=state.client_alpha.shape[0])
        xs = (data, keys, n, cohort.take(state.client_params), cohort.take(state.client_alpha))
        (losses, personal, alphas), (delta_sum, weight_sum) = ex.map_reduce(
            client_update, (state.params, state.hparams), xs, execution)
        server_opt = local.make_optimizer(server_optimizer, state.hparams["server_lr"])
        params, opt_state = aggregation.server_update(
            server_opt, state.params, state.opt_state, aggregation.safe_div(delta_sum, weight_sum))
        metrics = {"train_loss": round_lib.mean_loss(losses, n)}
        if diagnostics:
            metrics["diagnostics"] = {"clients": cohort.ids, "alpha": alphas}
        return state.replace(
            round=state.round + 1, params=params, opt_state=opt_state,
            client_params=cohort.put(state.client_params, personal),
            client_alpha=cohort.put(state.client_alpha, alphas)), metrics

    def evaluate(state, train, test):
        algorithm.check_same_clients(train.num_clients, test, "test")

        def client(params, x):
            personal, a, test_row = x
            return {**local.evaluate_client(model, mix(a, personal, params), test_row),
                    "alpha": a}

        return ex.map_clients(client, state.params,
                              (state.client_params, state.client_alpha, test), execution)

    return FederatedAlgorithm(init, round_fn, evaluate)
