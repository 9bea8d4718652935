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

import dataclasses

import jax
import jax.numpy as jnp
import optax
from flax import struct

from fedjax_pfl.core import aggregation, algorithm, config, local, server
from fedjax_pfl.core import execution as ex
from fedjax_pfl.core import round as round_lib
from fedjax_pfl.core.algorithm import FederatedAlgorithm
from fedjax_pfl.models.model import Model


@struct.dataclass
class APFLState:
    """APFL's round, global model w (`params`) with its server `opt_state`, the
    stacked local models v_i (`client_params`, leaves [M, ...]) and weights
    alpha_i (`client_alpha` [M]); `hparams`: client_lr, server_lr, alpha_lr."""

    round: jax.Array
    params: object
    opt_state: object
    client_params: object
    client_alpha: jax.Array
    hparams: dict


def _unit_interval(name, value):
    algorithm.check_arg(name, value, isinstance(value, (int, float)) and not isinstance(
        value, bool) and 0.0 <= value <= 1.0, "a number in [0, 1]")


@dataclasses.dataclass(frozen=True, kw_only=True)
class APFLConfig(config.ServerConfig):
    """APFL's hyperparameters (`config.ServerConfig`'s, and):

    Attributes:
      alpha: every client's initial mixing weight, in [0, 1] (static).
      alpha_lr: step size of the alpha update (traced; None: `client_lr`; 0: fixed).
      diagnostics: add each round's alpha_i of the cohort to the metrics
        (`metrics["diagnostics"]`: "clients" [S], "alpha" [S]).
    """

    alpha: float = config.field(0.5, check=_unit_interval)
    alpha_lr: float | None = config.number(None, optional=True)
    diagnostics: bool = config.flag(False)

    def hparams(self) -> dict:
        hp = super().hparams()
        # a separate buffer: state leaves that share one cannot both be donated
        return {**hp, "alpha_lr": jnp.array(hp["client_lr"])} if self.alpha_lr is None else hp


def mix(alpha, local_params, global_params):
    """alpha v + (1 - alpha) w, leaf by leaf."""
    return jax.tree.map(lambda v, w: alpha * v + (1.0 - alpha) * w, local_params, global_params)


def apfl_step(loss_fn, optimizer, alpha_lr):
    """`local_train`'s step of APFL on the carry (w_i, v_i, alpha_i, opt_state)."""
    def step(carry, batch, bw, k):
        w, v, a, opt_state = carry
        loss = lambda p: jnp.sum(bw * loss_fn(p, batch, k))
        data_loss, grad_w = jax.value_and_grad(loss)(w)
        grad_mix = jax.grad(loss)(mix(a, v, w))
        grad_v = jax.tree.map(lambda g: a * g, grad_mix)
        grad_a = optax.tree.vdot(optax.tree.sub(v, w), grad_mix)
        updates, new_opt_state = optimizer.update((grad_w, grad_v), opt_state, (w, v))
        new_w, new_v = optax.apply_updates((w, v), updates)
        new_a = jnp.clip(a - alpha_lr * grad_a, 0.0, 1.0)
        return (new_w, new_v, new_a, new_opt_state), data_loss

    return step


@config.factory(APFLConfig)
def apfl(model: Model, cfg: APFLConfig) -> FederatedAlgorithm:
    """APFL; hyperparameters: `APFLConfig`."""
    loss_fn = local.model_loss_fn(model)

    def init(key, train, params=None):
        params, hp, opt_state = server.init(model, cfg, key, train, params)
        m = train.num_clients
        return APFLState(jnp.zeros((), jnp.int32), params, opt_state,
                         round_lib.replicate(params, m), jnp.full((m,), cfg.alpha, jnp.float32), hp)

    def client_update(broadcast, x):
        params, hp = broadcast
        data, key, weight, personal, a = x
        optimizer = local.make_optimizer(cfg.schedule.optimizer, hp["client_lr"])
        start = (params, personal, a, optimizer.init((params, personal)))
        result = cfg.schedule.run(apfl_step(loss_fn, optimizer, hp["alpha_lr"]), start, data, key)
        w, v, a, _ = result.params
        return (result.mean_loss(), v, a), aggregation.weighted_delta(w, params, weight)

    def round_fn(state, train, key, cohort=None):
        cohort, data, keys, n = round_lib.start(key, train, cfg.clients_per_round, cohort,
                                                state_clients=state.client_alpha.shape[0])
        xs = (data, keys, n, cohort.take(state.client_params), cohort.take(state.client_alpha))
        (losses, personal, alphas), (delta_sum, weight_sum) = ex.map_reduce(
            client_update, (state.params, state.hparams), xs, cfg.strategy)
        params, opt_state = server.step(cfg, state, delta_sum, weight_sum)
        metrics = {"train_loss": round_lib.mean_loss(losses, n)}
        if cfg.diagnostics:
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
                              (state.client_params, state.client_alpha, test), cfg.strategy)

    return FederatedAlgorithm(init, round_fn, evaluate)
