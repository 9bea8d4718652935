"""FedFew's round as it was before streaming (private: not a registered algorithm).

It reuses FedFew's own client trainer (`core.kmodels.client_trainer`), so it is an
equivalence check of the streamed reduction, not an independent reference (those live in
`fedjax_pfl.testing`, e.g. `naive_kmodels`).

Every cohort client's K deltas are returned per client ([S, K, ...], O(S K d)
memory), the weights are formed from all the losses with `stch_weights`, and
the update is the dense sum_i alpha_i w_ik delta_ik. The streamed round of
`algorithms.fedfew` must equal it (tests/algorithms/test_fedfew.py), and
benchmarks/k_models.py compiles both to compare their memory.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from fedjax_pfl.core import aggregation, local
from fedjax_pfl.core import execution as ex
from fedjax_pfl.core import round as round_lib
from fedjax_pfl.core.kmodels import client_trainer, stch_weights
from fedjax_pfl.models.model import Model


def dense_fedfew_round(model: Model, *, num_models: int = 3, clients_per_round=None,
                       batch_size: int = 32, local_steps=None, local_epochs=None,
                       client_optimizer="sgd", server_optimizer="sgd",
                       loss_at: str = "last_epoch", per_model_orders: bool = True,
                       execution="vmap", **unused):
    """`round(state, train, key, cohort=None) -> (params, opt_state, losses [S, K])`.

    Takes `fedfew`'s arguments (the traced ones come from `state.hparams`; the
    evaluation ones are ignored).
    """
    del unused
    schedule = local.LocalSchedule(batch_size, local_steps, local_epochs, client_optimizer)
    train_all = client_trainer(model, num_models, schedule, per_model_orders, loss_at)
    execution = ex.as_execution(execution)

    def client_update(broadcast, x):
        params, hp = broadcast
        trained, losses = train_all(params, *x, hp["client_lr"])
        return (jax.tree.map(jnp.subtract, trained, params), losses), ()

    def round_fn(state, train, key, cohort=None):
        _, data, keys, _ = round_lib.start(key, train, clients_per_round, cohort)
        (deltas, losses), _ = ex.map_reduce(client_update, (state.params, state.hparams),
                                            (data, keys), execution)
        w, alpha = stch_weights(losses, data.num_examples, state.hparams["mu"])
        coef = alpha[:, None] * w
        mean_delta = jax.tree.map(lambda d: jnp.einsum("sk,sk...->k...", coef, d), deltas)
        opt = local.make_optimizer(server_optimizer, state.hparams["server_lr"])
        params, opt_state = aggregation.server_update(opt, state.params, state.opt_state,
                                                      mean_delta)
        return params, opt_state, losses

    return round_fn
