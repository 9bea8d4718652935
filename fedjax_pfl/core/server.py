"""The server side shared by the algorithms: the round-0 pieces of `init` (one
global model, or K stacked ones when the config has `num_models`), the step of
a server optimizer (`config.ServerConfig`) on the cohort's mean delta, and the
test of per-client (personal) models.
"""

from __future__ import annotations

from fedjax_pfl.core import aggregation, algorithm, local
from fedjax_pfl.core import execution as ex
from fedjax_pfl.models.model import Model


def init(model: Model, cfg, key, train, params=None):
    """(params, hparams, server optimizer state) at round 0, after every data check.

    `cfg`: the algorithm's config; the optimizer state is None when it has no
    `server_optimizer` (no `config.ServerConfig`). A config with `num_models`
    (K) gets K models stacked [K, ...], independent inits when `cfg.init` is
    "independent".
    """
    algorithm.check_data(model, train, cfg.clients_per_round)
    num_models = getattr(cfg, "num_models", None)
    params = algorithm.initial_params(model, key, params, num_models=num_models,
                                      independent=getattr(cfg, "init", None) == "independent")
    hp = cfg.hparams()
    if getattr(cfg, "server_optimizer", None) is None:
        return params, hp, None
    return params, hp, local.make_optimizer(cfg.server_optimizer, hp["server_lr"]).init(params)


def step(cfg, state, delta_sum, weight_sum):
    """(params, opt_state) after the server optimizer's step on delta_sum / weight_sum."""
    return step_on(cfg, state, aggregation.safe_div(delta_sum, weight_sum))


def step_on(cfg, state, mean_delta, params=None, opt_state=None):
    """(params, opt_state) after the server optimizer's step on the pseudo-gradient
    `mean_delta` (from `state`'s, or the given, params and optimizer state)."""
    server_opt = local.make_optimizer(cfg.server_optimizer, state.hparams["server_lr"])
    return aggregation.server_update(
        server_opt, state.params if params is None else params,
        state.opt_state if opt_state is None else opt_state, mean_delta)


def evaluate_personal(model: Model, client_params, test, execution: ex.Execution):
    """Per-client test statistics [M] of the stacked per-client models (leaves [M, ...])."""
    return ex.map_clients(lambda _, x: local.evaluate_client(model, *x), (),
                          (client_params, test), execution)


def evaluate_shared(model: Model, params, test, execution: ex.Execution):
    """Per-client test statistics [M] of one model shared by every client."""
    return ex.map_clients(lambda p, d: local.evaluate_client(model, p, d), params, test, execution)
