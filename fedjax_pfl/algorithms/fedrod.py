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

Paper symbol -> argument: the head (the personal head's shape) -> `personal`
(the old `head=` is accepted with a DeprecationWarning), E -> `local_epochs`, B ->
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

from fedjax_pfl.core import aggregation, algorithm, config, local
from fedjax_pfl.core import execution as ex
from fedjax_pfl.core import partial as partial_lib
from fedjax_pfl.core import round as round_lib
from fedjax_pfl.core.algorithm import FederatedAlgorithm
from fedjax_pfl.data.client_data import client_examples
from fedjax_pfl.models.model import Model, cross_entropy


@struct.dataclass
class FedRoDState:
    """State of FedRoD.

    Attributes:
      round: int32 scalar, rounds completed.
      params: the federated model: body and generic head (the model's params).
      personal_head: h_i, each client's personal head (flat dict, leaves [M, ...]).
      hparams: traced scalars: client_lr.
    """

    round: jax.Array
    params: object
    personal_head: dict
    hparams: dict


def log_class_counts(model: Model, params, data) -> jax.Array:
    """log N_i(c) of ONE client's training labels [C] (-1e9 for absent classes)."""
    examples = client_examples(data)  # [N, ...] in either layout
    num_classes = jax.eval_shape(model.apply, params, examples, None).shape[-1]
    rows = jnp.arange(examples["y"].shape[0]) < data.num_examples
    counts = jnp.sum(jax.nn.one_hot(examples["y"], num_classes) * rows[:, None], 0)
    return jnp.where(counts > 0, jnp.log(jnp.maximum(counts, 1.0)), -1e9)


@config.factory(partial_lib.PersonalConfig, aliases={"head": "personal"})
def fedrod(model: Model, cfg: partial_lib.PersonalConfig) -> FederatedAlgorithm:
    """FedRoD (balanced generic head + personal head h_i of the `personal` params' shape).

    Hyperparameters: `core.partial.PersonalConfig`; the model gives logits
    [B, C] for integer labels `y`.
    """
    part = partial_lib.model_partition(model, cfg.personal)

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
        algorithm.check_data(model, train, cfg.clients_per_round)
        params = algorithm.initial_params(model, key, params)
        h = part.split(params)[0]
        return FedRoDState(jnp.zeros((), jnp.int32), params,
                           round_lib.replicate(h, train.num_clients), cfg.hparams())

    def client_update(broadcast, x):
        params, hp = broadcast
        h, data, key, weight = x
        result = cfg.schedule.train(fedrod_loss(log_class_counts(model, params, data)),
                                    (params, h), data, key, hp["client_lr"])
        new_params, h = result.params
        return (h, result.mean_loss()), aggregation.weighted_delta(new_params, params, weight)

    def round_fn(state, train, key, cohort=None):
        params, h, (losses,), n = partial_lib.averaged_round(
            cfg, client_update, (state.params, state.hparams), state.personal_head, train, key,
            cohort)
        metrics = {"train_loss": round_lib.mean_loss(losses, n)}
        return state.replace(round=state.round + 1, params=params, personal_head=h), metrics

    def evaluate(state, train, test):
        del train
        one = lambda params, x: local.evaluate_client(combined, (params, x[0]), x[1])
        return ex.map_clients(one, state.params, (state.personal_head, test), cfg.strategy)

    return FederatedAlgorithm(init, round_fn, evaluate)
