"""Ditto: a FedAvg global model plus personal models pulled towards it.

Reference:
  Li, Hu, Beirami, Smith, "Ditto: Fair and Robust Federated Learning Through
  Personalization", ICML 2021 (arXiv 2012.04221), Algorithm 1.

Each cohort client (1) trains a copy of the received global model w^t on its
data exactly as in FedAvg, and (2) updates its personal model v_i for s local
steps (by default as many as the global copy takes) on
f_i(v) + lambda/2 ||v - w^t||^2, i.e.
v <- v - eta_p (grad f_i(v) + lambda (v - w^t)). The server averages the global
copies (n_i-weighted); personal models never leave the client and are stacked
[M, ...] in the state. Evaluation tests each client's personal model.

Paper symbol -> argument: lambda -> `lam`, eta -> `client_lr` (global copy),
personal step size -> `personal_lr` (default: `client_lr`), s local personal
iterations -> `personal_steps` / `personal_epochs` (default: the global copy's
schedule, `local_steps` / `local_epochs`), |batch| -> `batch_size` (both
updates). The personal minibatch order uses the key `fold_in(client_key, 1)`;
the global copy uses the client key itself, so the global model follows FedAvg
exactly. All personal models start at the global init.

Paper vs released code on the personal schedule: Algorithm 1 of the paper
gives the personal solver its own count, "s local iterations", separate from
the global solver's local updates. The released code (github.com/litian96/ditto,
flearn/trainers_MTL/ditto.py) runs ONE loop of `local_iters` minibatches in
which each batch first takes a personal SGD step and then a global SGD step,
both with `learning_rate`: s equals the global model's local steps and the two
updates share their minibatches. The default here (personal schedule = the
local schedule, personal_lr = client_lr) is that count; `personal_steps` or
`personal_epochs` gives the paper's separate s. The minibatches are never
shared (each model has its own order, see above).
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
from fedjax_pfl.models.model import Model


@struct.dataclass
class DittoState:
    """State of Ditto.

    Attributes:
      round: int32 scalar, rounds completed.
      params: the global model.
      opt_state: the server optimizer's state.
      client_params: every client's personal model, leaves [M, ...].
      hparams: traced scalars: client_lr, server_lr, lam, personal_lr.
    """

    round: jax.Array
    params: object
    opt_state: object
    client_params: object
    hparams: dict


def ditto(
    model: Model,
    *,
    lam: float = 0.1,
    personal_lr: float | None = None,
    personal_steps: int | None = None,
    personal_epochs: int | None = None,
    clients_per_round: int | None = None,
    batch_size: int = 32,
    local_steps: int | None = None,
    local_epochs: int | None = None,
    client_optimizer: local.OptimizerSpec = "sgd",
    client_lr: float = 0.05,
    server_optimizer: local.OptimizerSpec = "sgd",
    server_lr: float = 1.0,
    execution: str | ex.Execution = "vmap",
) -> FederatedAlgorithm:
    """Ditto.

    Args:
      model: the model.
      lam: lambda, the pull of personal models towards the global one (traced).
      personal_lr: the personal models' lr (traced; None: `client_lr`).
      personal_steps, personal_epochs: s, the personal model's local schedule
        in minibatch steps or in epochs (static; set at most one). None for
        both: the global copy's schedule (`local_steps` / `local_epochs`).
      clients_per_round: S, sampled without replacement each round (None: all).
      batch_size: B of both updates.
      local_steps, local_epochs: local schedule of the global copy (and of the
        personal model unless `personal_steps` / `personal_epochs` is set).
      client_optimizer, client_lr: the client optimizer and the global copy's lr.
      server_optimizer, server_lr: server optimizer on the pseudo-gradient.
      execution: client-axis strategy.
    """
    algorithm.check_number("lam", lam)
    if personal_lr is not None:
        algorithm.check_number("personal_lr", personal_lr)
    algorithm.check_cohort_size(clients_per_round)
    algorithm.check_number("client_lr", client_lr)
    algorithm.check_number("server_lr", server_lr)
    local.check_optimizer("server_optimizer", server_optimizer)
    schedule = local.LocalSchedule(batch_size, local_steps, local_epochs, client_optimizer)
    personal_schedule = schedule
    if personal_steps is not None or personal_epochs is not None:
        for name, value in (("personal_steps", personal_steps),
                            ("personal_epochs", personal_epochs)):
            algorithm.check_arg(name, value, value is None or (
                isinstance(value, int) and not isinstance(value, bool) and value >= 1),
                "None or an int >= 1")
        if personal_steps is not None and personal_epochs is not None:
            raise ValueError(f"personal_steps / personal_epochs: set at most one, got "
                             f"personal_steps={personal_steps!r}, "
                             f"personal_epochs={personal_epochs!r}.")
        personal_schedule = local.LocalSchedule(batch_size, personal_steps, personal_epochs,
                                                client_optimizer)
    execution = ex.as_execution(execution)
    loss_fn = local.model_loss_fn(model)

    def init(key, train, params=None):
        algorithm.check_data(model, train, clients_per_round)
        params = algorithm.initial_params(model, key, params)
        personal = round_lib.replicate(params, train.num_clients)
        hp = algorithm.hparams(client_lr=client_lr, server_lr=server_lr, lam=lam,
                               personal_lr=client_lr if personal_lr is None else personal_lr)
        opt_state = local.make_optimizer(server_optimizer, hp["server_lr"]).init(params)
        return DittoState(jnp.zeros((), jnp.int32), params, opt_state, personal, hp)

    def client_update(broadcast, x):
        params, hp = broadcast
        data, key, weight, personal = x
        result = schedule.train(loss_fn, params, data, key, hp["client_lr"])
        penalty = lambda v: 0.5 * hp["lam"] * optax.tree.norm(optax.tree.sub(v, params),
                                                              squared=True)
        personal = personal_schedule.train(loss_fn, personal, data, jax.random.fold_in(key, 1),
                                           hp["personal_lr"], penalty).params
        y = (result.mean_loss(), personal)
        return y, aggregation.weighted_delta(result.params, params, weight)

    def round_fn(state, train, key, cohort=None):
        cohort, data, keys, n = round_lib.start(
            key, train, clients_per_round, cohort,
            state_clients=round_lib.num_clients_of(state.client_params))
        (losses, personal), (delta_sum, weight_sum) = ex.map_reduce(
            client_update, (state.params, state.hparams),
            (data, keys, n, cohort.take(state.client_params)), execution)
        server_opt = local.make_optimizer(server_optimizer, state.hparams["server_lr"])
        params, opt_state = aggregation.server_update(
            server_opt, state.params, state.opt_state, aggregation.safe_div(delta_sum, weight_sum))
        metrics = {"train_loss": round_lib.mean_loss(losses, n)}
        return state.replace(round=state.round + 1, params=params, opt_state=opt_state,
                             client_params=cohort.put(state.client_params, personal)), metrics

    def evaluate(state, train, test):
        algorithm.check_same_clients(train.num_clients, test, "test")
        return ex.map_clients(lambda _, x: local.evaluate_client(model, *x), (),
                              (state.client_params, test), execution)

    return FederatedAlgorithm(init, round_fn, evaluate)
