"""FedEM: every client's distribution is a mixture of K shared components.

Reference:
  Marfoq, Neglia, Bellet, Kameni, Vidal, "Federated Multi-Task Learning under a
  Mixture of Distributions", NeurIPS 2021 (arXiv 2108.10252), Algorithm 1
  (client-server FedEM).

Client i's model is p_i(y|x) = sum_k pi_ik p(y|x; theta_k). Each round, every
cohort client, with the K received components theta_k:
  E-step:  q_ij(k) ∝ pi_ik exp(-l(theta_k; x_ij, y_ij))   for each example j;
  M-step:  pi_ik <- (1/n_i) sum_j q_ij(k);
  then trains each component k locally on the responsibility-weighted loss
  (1/n_i) sum_j q_ij(k) l(theta_k; x_ij, y_ij);
and the server averages each component: theta_k <- sum_i (n_i/n) theta_k^i.
Clients outside the cohort keep pi_i bit-identical.

Paper symbol -> argument: M (components) -> `num_models`, J (local steps) ->
`local_steps` / `local_epochs`, `client_lr`, `clients_per_round`.
Choices: pi_i starts uniform (1/K) and components from independent inits, as
in the released code (`init="shared"` starts them equal, and equal components
get equal responsibilities and stay equal: meant for K = 1). Every component is
trained on the same minibatches (the client's key), where the released code
draws each component's batches separately; so with K = 1 (and `init="shared"`)
FedEM is FedAvg exactly. A client with no data keeps pi_i. `train_loss` is the summed
responsibility-weighted loss of the components (the M-step objective).
Evaluation predicts with the client's mixture sum_k pi_ik softmax(f_k(x)) (the
model's outputs are read as logits).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct

from fedjax_pfl.core import aggregation, algorithm, config, kmodels, local, server
from fedjax_pfl.core import execution as ex
from fedjax_pfl.core import round as round_lib
from fedjax_pfl.core.algorithm import FederatedAlgorithm
from fedjax_pfl.data.client_data import ClientData, client_capacity, client_examples
from fedjax_pfl.models.model import Model

WEIGHT = "fedem_responsibility"  # the batch field carrying q_ij(k) during local training


@struct.dataclass
class FedEMState(kmodels.KModelsState):
    """State of FedEM: `kmodels.KModelsState` (params: the K components theta_k;
    hparams: client_lr, server_lr), and

    Attributes:
      mixture: pi, float32 [M, K], each client's mixture weights.
    """

    mixture: jax.Array


@config.factory(kmodels.KModelsConfig, num_models=2)
def fedem(model: Model, cfg: kmodels.KModelsConfig) -> FederatedAlgorithm:
    """FedEM (EM over a mixture of K shared components; K = the paper's M, default 2).

    Hyperparameters: `kmodels.KModelsConfig`. The model's outputs are logits of
    p(y|x; theta).
    """
    loss_fn = local.model_loss_fn(model)
    weighted_loss = lambda p, batch, key: batch[WEIGHT] * loss_fn(p, batch, key)

    def mixture_apply(params, batch, key=None):
        """log sum_k pi_k softmax(f_k(x)): the mixture's log-probabilities."""
        thetas, pi = params
        log_p = jax.nn.log_softmax(jax.vmap(lambda t: model.apply(t, batch, key))(thetas), -1)
        log_pi = jnp.log(pi).reshape((-1,) + (1,) * (log_p.ndim - 1))
        return jax.nn.logsumexp(log_pi + log_p, axis=0)

    mixture_model = model._replace(apply=mixture_apply)

    def init_fn(key, train, params=None):
        k = cfg.num_models
        return kmodels.init_state(FedEMState, model, cfg, key, train, params,
                                  mixture=jnp.full((train.num_clients, k), 1.0 / k, jnp.float32))

    def client_update(broadcast, x):
        params, hp = broadcast
        pi, data, key = x
        n = data.num_examples.astype(jnp.float32)
        examples = client_examples(data)  # [N, ...] in either layout
        rows = jnp.arange(client_capacity(data)) < data.num_examples
        losses = jax.vmap(lambda t: model.loss(model.apply(t, examples, None),
                                               examples))(params)  # [K, N]
        q = jnp.where(rows, jax.nn.softmax(jnp.log(pi)[:, None] - losses, axis=0), 0.0)  # E-step
        new_pi = jnp.where(n > 0, jnp.sum(q, 1) / jnp.maximum(n, 1.0), pi)  # M-step

        def train_component(theta, q_k):
            weighted = ClientData({**examples, WEIGHT: q_k}, data.num_examples)  # dense view
            return cfg.schedule.train(weighted_loss, theta, weighted, key, hp["client_lr"])

        result = jax.vmap(train_component)(params, q)
        mean_losses = jnp.sum(result.losses * result.counts, 1) / jnp.maximum(
            jnp.sum(result.counts, 1), 1.0)
        delta = jax.tree.map(lambda c, s: n * (c - s), result.params, params)
        return (new_pi, jnp.sum(mean_losses)), (delta, n)

    def round_fn(state, train, key, cohort=None):
        cohort, data, keys, n = round_lib.start(key, train, cfg.clients_per_round, cohort,
                                                state_clients=state.mixture.shape[0])
        (pi, losses), (delta_sum, n_sum) = ex.map_reduce(
            client_update, (state.params, state.hparams), (cohort.take(state.mixture), data, keys),
            cfg.strategy)
        params, opt_state = server.step_on(cfg, state, aggregation.safe_div(delta_sum, n_sum))
        metrics = {"train_loss": round_lib.mean_loss(losses, n)}
        return state.replace(round=state.round + 1, params=params, opt_state=opt_state,
                             mixture=cohort.put(state.mixture, pi)), metrics

    def evaluate(state, train, test):
        algorithm.check_same_clients(state.mixture.shape[0], test, "test")
        return ex.map_clients(lambda t, x: local.evaluate_client(mixture_model, (t, x[0]), x[1]),
                              state.params, (state.mixture, test), cfg.strategy)

    return FederatedAlgorithm(init_fn, round_fn, evaluate)
