"""Local: every client trains its own model and nothing is communicated.

The lower reference point of personalized FL: client i's model is trained only
on its own data, for the same local schedule as the federated methods, in the
rounds where it is in the cohort. All clients start from the same init.
State: per-client params stacked [M, ...].
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct

from fedjax_pfl.core import algorithm, config, local
from fedjax_pfl.core import execution as ex
from fedjax_pfl.core import round as round_lib
from fedjax_pfl.core.algorithm import FederatedAlgorithm
from fedjax_pfl.models.model import Model


@struct.dataclass
class LocalState:
    """Attributes:
      round: int32 scalar.
      client_params: every client's model, leaves [M, ...].
      hparams: traced scalars: client_lr.
    """

    round: jax.Array
    client_params: object
    hparams: dict


@config.factory(config.Config)
def local_only(model: Model, cfg: config.Config) -> FederatedAlgorithm:
    """Local training only (no communication); hyperparameters: `core.config.Config`."""
    schedule, execution = cfg.schedule, cfg.strategy
    loss_fn = local.model_loss_fn(model)

    def init(key, train, params=None):
        algorithm.check_data(model, train, cfg.clients_per_round)
        stacked = round_lib.replicate(algorithm.initial_params(model, key, params),
                                      train.num_clients)
        return LocalState(jnp.zeros((), jnp.int32), stacked, cfg.hparams())

    def client_update(hp, x):
        params, data, key = x
        result = schedule.train(loss_fn, params, data, key, hp["client_lr"])
        return (result.params, result.mean_loss()), ()

    def round_fn(state, train, key, cohort=None):
        cohort, data, keys, n = round_lib.start(
            key, train, cfg.clients_per_round, cohort,
            state_clients=round_lib.num_clients_of(state.client_params))
        (params, losses), _ = ex.map_reduce(
            client_update, state.hparams, (cohort.take(state.client_params), data, keys), execution)
        metrics = {"train_loss": round_lib.mean_loss(losses, n)}
        client_params = cohort.put(state.client_params, params)
        return state.replace(round=state.round + 1, client_params=client_params), metrics

    def evaluate(state, train, test):
        del train
        return ex.map_clients(lambda _, x: local.evaluate_client(model, *x), (),
                              (state.client_params, test), execution)

    return FederatedAlgorithm(init, round_fn, evaluate)
