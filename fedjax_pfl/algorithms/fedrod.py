"""FedRoD: a generic head trained for balance plus a personal head per client.

Reference:
  Chen, Chao, "On Bridging Generic and Personalized Federated Learning for
  Image Classification", ICLR 2022 (arXiv 2107.00778); the variant with a
  linear personal head (no hypernetwork).

The model is a body f and a head; FedRoD keeps two heads on f: the generic
head g (federated with the body) and a personal head h_i per client. Each
local step on a minibatch of client i:
  body, g <- SGD on the balanced softmax loss  CE(g(f(x)) + log N_i(y), y)
             (N_i(c): client i's count of class c, Ren et al. 2020);
  h_i     <- SGD on  CE(sg[g(f(x))] + h_i(sg[f(x)]), y)   (sg: stop-gradient).
The server averages (body, g) over the cohort (n_i-weighted, or `weighting`);
clients keep h_i. Client i predicts with g(f(x)) + h_i(f(x)).

Paper symbol -> argument: the head -> `head`, E -> `local_epochs`, B ->
`batch_size`, eta -> `client_lr` (both updates).
Choices: h_i(f(x)) is computed as the model with its head params replaced by
h_i, so any model whose head is additive on the logits works; h_i starts as the
head's initialization (as in PFLlib) and both updates use one optimizer step
on the summed objective (their gradients touch disjoint params, so with SGD
this is the two separate steps of the released code). Classes the client
lacks get a log-count of -1e9. Labels must be integers `y` [N] (no sequences).
`train_loss` is the sum of the two losses.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct

from fedjax_pfl.core import aggregation, algorithm, local
from fedjax_pfl.core import execution as ex
from fedjax_pfl.core import params as params_lib
from fedjax_pfl.core import round as round_lib
from fedjax_pfl.core.algorithm import FederatedAlgorithm
from fedjax_pfl.data.client_data import client_examples
from fedjax_pfl.models.model import Model, cross_entropy

WEIGHTINGS = ("num_examples", "uniform")


@struct.dataclass
class FedRoDState:
    """State of FedRoD.

    Attributes:
      round: int32 scalar, rounds completed.
      params: the federated model: body and generic head (the model's params).
      personal_head: h_i, every client's personal head: flat dict, leaves [M, ...].
      hparams: traced scalars: client_lr.
    """

    round: jax.Array
    params: object
    personal_head: dict
    hparams: dict


def fedrod(
    model: Model,
    *,
    head=("head",),
    clients_per_round: int | None = None,
    batch_size: int = 32,
    local_steps: int | None = None,
    local_epochs: int | None = None,
    client_optimizer: local.OptimizerSpec = "sgd",
    client_lr: float = 0.05,
    weighting: str = "num_examples",
    execution: str | ex.Execution = "vmap",
) -> FederatedAlgorithm:
    """FedRoD (balanced generic head + personal head on a shared body).

    Args:
      model: the model (logits [B, C], integer labels `y`).
      head: which params form the head (module names, regex or predicate).
      clients_per_round: S, sampled without replacement each round (None: all).
      batch_size, local_steps, local_epochs: local schedule (default 1 epoch).
      client_optimizer, client_lr: the client optimizer and its lr (traced).
      weighting: "num_examples" (n_i-weighted mean) or "uniform".
      execution: client-axis strategy.
    """
    algorithm.check_cohort_size(clients_per_round)
    algorithm.check_number("client_lr", client_lr)
    algorithm.check_arg("weighting", weighting, weighting in WEIGHTINGS, f"one of {WEIGHTINGS}")
    part = params_lib.partition(jax.eval_shape(model.init, jax.random.key(0)), head, name="head")
    schedule = local.LocalSchedule(batch_size, local_steps, local_epochs, client_optimizer)
    execution = ex.as_execution(execution)

    def personal_logits(params, h, batch, key):
        """h(f(x)): the model with its head params replaced by h."""
        return model.apply(part.merge(h, part.split(params)[1]), batch, key)

    def fedrod_loss(log_counts):
        def loss(p, batch, key):
            params, h = p
            generic = model.apply(params, batch, key)
            balanced = cross_entropy(generic + log_counts[None, :], batch)
            personal = personal_logits(jax.lax.stop_gradient(params), h, batch, key)
            return balanced + cross_entropy(jax.lax.stop_gradient(generic) + personal, batch)
        return loss

    combined = model._replace(apply=lambda p, batch, key=None: model.apply(p[0], batch, key)
                              + personal_logits(p[0], p[1], batch, key))

    def init(key, train, params=None):
        algorithm.check_data(model, train, clients_per_round)
        params = algorithm.initial_params(model, key, params)
        h = part.split(params)[0]
        return FedRoDState(jnp.zeros((), jnp.int32), params,
                           round_lib.replicate(h, train.num_clients),
                           algorithm.hparams(client_lr=client_lr))

    def client_update(broadcast, x):
        params, hp = broadcast
        h, data, key, weight = x
        examples = client_examples(data)  # [N, ...] in either layout
        num_classes = jax.eval_shape(model.apply, params, examples, None).shape[-1]
        rows = jnp.arange(examples["y"].shape[0]) < data.num_examples
        counts = jnp.sum(jax.nn.one_hot(examples["y"], num_classes) * rows[:, None], 0)
        log_counts = jnp.where(counts > 0, jnp.log(jnp.maximum(counts, 1.0)), -1e9)
        result = schedule.train(fedrod_loss(log_counts), (params, h), data, key,
                                hp["client_lr"])
        new_params, h = result.params
        return (h, result.mean_loss()), aggregation.weighted_delta(new_params, params, weight)

    def round_fn(state, train, key, cohort=None):
        cohort, data, keys, n = round_lib.start(
            key, train, clients_per_round, cohort,
            state_clients=round_lib.num_clients_of(state.personal_head))
        weights = n if weighting == "num_examples" else (n > 0).astype(jnp.float32)
        (h, losses), (delta_sum, weight_sum) = ex.map_reduce(
            client_update, (state.params, state.hparams),
            (cohort.take(state.personal_head), data, keys, weights), execution)
        params = jax.tree.map(jnp.add, state.params, aggregation.safe_div(delta_sum, weight_sum))
        metrics = {"train_loss": round_lib.mean_loss(losses, n)}
        return state.replace(round=state.round + 1, params=params,
                             personal_head=cohort.put(state.personal_head, h)), metrics

    def evaluate(state, train, test):
        del train
        one = lambda params, x: local.evaluate_client(combined, (params, x[0]), x[1])
        return ex.map_clients(one, state.params, (state.personal_head, test), execution)

    return FederatedAlgorithm(init, round_fn, evaluate)
