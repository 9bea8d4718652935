"""SCAFFOLD: FedAvg with control variates that correct client drift.

Reference:
  Karimireddy, Kale, Mohri, Reddi, Stich, Suresh, "SCAFFOLD: Stochastic
  Controlled Averaging for Federated Learning", ICML 2020 (arXiv 1910.06378),
  Algorithm 1 with option II.

Each round, for every cohort client i (server model x, server control c,
client control c_i):
  y_i <- x;  K steps of  y_i <- y_i - eta_l (g_i(y_i) - c_i + c)
  c_i+ <- c_i - c + (x - y_i) / (K eta_l)                        (option II)
and the server applies
  x <- x + eta_g * mean_i (y_i - x),   c <- c + (1/N) sum_i (c_i+ - c_i).
Clients outside the cohort keep c_i bit-identical.

Paper symbol -> argument: eta_l -> `client_lr`, eta_g -> `server_lr` (the step
of `server_optimizer`, plain SGD by default), K -> `local_steps` (or
`local_epochs` passes), |S| -> `clients_per_round`.
Choices: the correction c - c_i enters as the gradient of the linear term
<c - c_i, y>, so any client optimizer sees the corrected gradient (the paper's
update is the plain-SGD case; option II's formula assumes SGD). K is the number
of steps the client actually took (epoch mode skips empty batches), so a client
with no data keeps its c_i. The paper averages uniformly (`weighting="uniform"`,
the default; "num_examples" weights the model update by n_i); N counts the
clients that hold data, so c stays the mean of their c_i.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import struct

from fedjax_pfl.core import aggregation, config, local, server
from fedjax_pfl.core import execution as ex
from fedjax_pfl.core import round as round_lib
from fedjax_pfl.core.algorithm import FederatedAlgorithm
from fedjax_pfl.models.model import Model


@struct.dataclass
class SCAFFOLDState:
    """SCAFFOLD's round, x (`params`) with its server `opt_state`, the server
    control c (`control`, the params' structure), every client's c_i
    (`client_control`, leaves [M, ...]); `hparams`: client_lr, server_lr."""

    round: jax.Array
    params: object
    opt_state: object
    control: object
    client_control: object
    hparams: dict


@dataclasses.dataclass(frozen=True, kw_only=True)
class SCAFFOLDConfig(config.ServerConfig):
    """SCAFFOLD's hyperparameters (`config.ServerConfig`'s, and):

    Attributes:
      weighting: "uniform" (paper) or "num_examples" mean of the model updates.
    """

    weighting: str = config.choice("uniform", ("uniform", "num_examples"))


def new_control(c_i, control, params, result: local.LocalResult, client_lr):
    """Option II: c_i+ = c_i - c + (x - y_i) / (K eta_l); c_i if the client took no step."""
    scale = jnp.sum(result.counts > 0) * client_lr  # K eta_l
    return jax.tree.map(lambda ci, c, s, y: jnp.where(
        scale > 0, ci - c + (s - y) / jnp.where(scale > 0, scale, 1.0), ci),
        c_i, control, params, result.params)


@config.factory(SCAFFOLDConfig)
def scaffold(model: Model, cfg: SCAFFOLDConfig) -> FederatedAlgorithm:
    """SCAFFOLD (control variates, option II); hyperparameters: `SCAFFOLDConfig`."""
    loss_fn = local.model_loss_fn(model)

    def init(key, train, params=None):
        params, hp, opt_state = server.init(model, cfg, key, train, params)
        zeros = jax.tree.map(jnp.zeros_like, params)
        return SCAFFOLDState(jnp.zeros((), jnp.int32), params, opt_state, zeros,
                             round_lib.replicate(zeros, train.num_clients), hp)

    def client_update(broadcast, x):
        params, control, hp = broadcast
        c_i, data, key, weight = x
        correction = jax.tree.map(jnp.subtract, control, c_i)
        penalty = lambda p: sum(jnp.vdot(a, b) for a, b in zip(jax.tree.leaves(correction),
                                                                jax.tree.leaves(p)))
        result = cfg.schedule.train(loss_fn, params, data, key, hp["client_lr"], penalty)
        new_c_i = new_control(c_i, control, params, result, hp["client_lr"])
        delta_c = jax.tree.map(jnp.subtract, new_c_i, c_i)
        return (new_c_i, result.mean_loss()), (
            aggregation.weighted_delta(result.params, params, weight), delta_c)

    def round_fn(state, train, key, cohort=None):
        cohort, data, keys, n = round_lib.start(
            key, train, cfg.clients_per_round, cohort,
            state_clients=round_lib.num_clients_of(state.client_control))
        (c_i, losses), ((delta_sum, weight_sum), delta_c) = ex.map_reduce(
            client_update, (state.params, state.control, state.hparams),
            (cohort.take(state.client_control), data, keys, cfg.weights(n)), cfg.strategy)
        params, opt_state = server.step(cfg, state, delta_sum, weight_sum)
        num_with_data = jnp.sum(train.num_examples > 0).astype(jnp.float32)
        control = jax.tree.map(jnp.add, state.control,
                               aggregation.safe_div(delta_c, num_with_data))
        metrics = {"train_loss": round_lib.mean_loss(losses, n)}
        return state.replace(round=state.round + 1, params=params, opt_state=opt_state,
                             control=control,
                             client_control=cohort.put(state.client_control, c_i)), metrics

    def evaluate(state, train, test):
        del train
        return ex.map_clients(lambda p, d: local.evaluate_client(model, p, d), state.params,
                              test, cfg.strategy)

    return FederatedAlgorithm(init, round_fn, evaluate)
