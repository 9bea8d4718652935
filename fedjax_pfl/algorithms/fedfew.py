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

import dataclasses

import jax
import jax.numpy as jnp
from flax import struct

from fedjax_pfl.core import algorithm, config, kmodels, sampling
from fedjax_pfl.core import execution as ex
from fedjax_pfl.core.algorithm import FederatedAlgorithm
from fedjax_pfl.core.kmodels import stch_weights
from fedjax_pfl.models.model import Model

LOSS_AT = ("last_epoch", "received")
PROTOCOLS = ("server", "local")


@struct.dataclass
class FedFewState(kmodels.KModelsState):
    """State of FedFew: `kmodels.KModelsState` (hparams: client_lr, server_lr, mu), and

    Attributes:
      last_params, last_key, last_cohort: the K models the last round started
        from (leaves [K, ...]), its key (uint32 key data) and cohort ([M] bool),
        for the `"local"` evaluation protocol.
    """

    last_params: object
    last_key: jax.Array
    last_cohort: jax.Array


@dataclasses.dataclass(frozen=True, kw_only=True)
class FedFewConfig(kmodels.KModelsConfig):
    """FedFew's hyperparameters (`kmodels.KModelsConfig`'s; the default server,
    plain SGD with lr 1, is the code's update), and:

    Attributes:
      mu: the smoothing temperature (> 0; traced).
      loss_at: "last_epoch" or "received"; init: "shared" (default) or
        "independent"; per_model_orders: each copy draws its own minibatch
        order; eval_protocol: "server" or "local" (see the module docstring).
      diagnostics: add each round's per-client quantities to the metrics
        (`metrics["diagnostics"]`: "clients" [S], "losses" L_ik [S, K],
        "w" w_ik [S, K], "alpha" alpha_i [S], "model" argmin_k L_ik [S]).
    """

    mu: float = config.number(0.01, strict=True)
    loss_at: str = config.choice("last_epoch", LOSS_AT)
    init: str = config.choice("shared", kmodels.INITS)
    per_model_orders: bool = config.flag(True)
    eval_protocol: str = config.choice("server", PROTOCOLS)
    diagnostics: bool = config.flag(False)


@config.factory(FedFewConfig)
def fedfew(model: Model, cfg: FedFewConfig) -> FederatedAlgorithm:
    """FedFew (FedFewS of the released code); hyperparameters: `FedFewConfig`."""
    train_all = kmodels.client_trainer(model, cfg.num_models, cfg.schedule, cfg.per_model_orders,
                                       cfg.loss_at)
    stch_round = kmodels.stch_round(cfg, train_all)
    evaluate_client = kmodels.evaluate_trained(model, train_all, cfg.eval_protocol == "local")

    def init(key, train, params=None):
        state = kmodels.init_state(FedFewState, model, cfg, key, train, params, last_params=None,
                                   last_key=kmodels.key_data(key),
                                   last_cohort=jnp.zeros((train.num_clients,), bool))
        # last_params is its own copy: a donated state must not hold one buffer twice.
        return state.replace(last_params=jax.tree.map(jnp.copy, state.params))

    def round_fn(state, train, key, cohort=None):
        last_params, last_cohort = state.params, state.last_cohort
        state, metrics, (cohort, data, losses) = stch_round(
            state, train, key, cohort, state_clients=last_cohort.shape[0])
        if cfg.diagnostics:
            w, alpha = stch_weights(losses, data.num_examples, state.hparams["mu"])
            metrics["diagnostics"] = {"clients": cohort.ids, "losses": losses, "w": w,
                                      "alpha": alpha, "model": jnp.argmin(losses, axis=1)}
        return state.replace(last_params=last_params, last_key=kmodels.key_data(key),
                             last_cohort=cohort.put(jnp.zeros_like(last_cohort),
                                                    jnp.ones(cohort.ids.shape, bool))), metrics

    def evaluate(state, train, test):
        algorithm.check_same_clients(train.num_clients, test, "test")
        _, client_key = sampling.round_keys(jax.random.wrap_key_data(state.last_key))
        keys = sampling.client_keys(client_key, jnp.arange(train.num_clients))
        broadcast = (state.params, state.last_params, state.hparams, state.round > 0)
        return ex.map_clients(evaluate_client, broadcast, (train, test, keys, state.last_cohort),
                              cfg.strategy)

    return FederatedAlgorithm(init, round_fn, evaluate)
