"""FedAvg with a per-client learning-rate decay: the worked example of docs/architecture.md.

Client i trains with step size `client_lr * decay**k_i`, where k_i is the
number of rounds it has already trained in (per-client state, [M] int32). With
`decay=1` it is FedAvg with the default server (`fedjax_pfl.algorithms.fedavg`,
n_i-weighted average of the client models); `decay=0` lets every client train
only in its first round. `decay` is traced (`state.hparams`), so
`simulate_grid` sweeps it in one compile.

Run it: `PYTHONPATH=. python docs/examples/fedavg_decay.py`.
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
class DecayState:
    """State of `fedavg_decay` (a pytree: `lax.scan` carries it, orbax saves it).

    Attributes:
      round: int32 scalar, rounds completed (the driver reads it).
      params: the global model.
      participations: [M] int32, rounds each client has trained in.
      hparams: traced scalars: client_lr, decay.
    """

    round: jax.Array
    params: object
    participations: jax.Array
    hparams: dict


def fedavg_decay(
    model: Model,
    *,
    clients_per_round: int | None = None,
    batch_size: int = 32,
    local_steps: int | None = None,
    local_epochs: int | None = None,
    client_lr: float = 0.05,
    decay: float = 0.9,
    execution: str | ex.Execution = "vmap",
) -> FederatedAlgorithm:
    """FedAvg whose client i uses the step size client_lr * decay**(rounds i trained in).

    Args:
      model: the model.
      clients_per_round: S, sampled without replacement each round (None: all).
      batch_size, local_steps, local_epochs: local schedule (default 1 epoch).
      client_lr: the initial client learning rate (traced).
      decay: the factor per participation (traced).
      execution: client-axis strategy ("vmap", "chunked", "sharded" or an `Execution`).
    """
    # Static configuration, checked when the algorithm is built: everything that
    # fixes a shape (S, the schedule, the strategy) is a Python value here.
    algorithm.check_cohort_size(clients_per_round)
    algorithm.check_number("client_lr", client_lr)
    algorithm.check_number("decay", decay)
    schedule = local.LocalSchedule(batch_size, local_steps, local_epochs, "sgd")
    execution = ex.as_execution(execution)
    loss_fn = local.model_loss_fn(model)

    def init(key, train, params=None):
        algorithm.check_data(model, train, clients_per_round)
        params = algorithm.initial_params(model, key, params)  # model.init(key) or checked
        return DecayState(round=jnp.zeros((), jnp.int32), params=params,
                          participations=jnp.zeros((train.num_clients,), jnp.int32),
                          hparams=algorithm.hparams(client_lr=client_lr, decay=decay))

    def client_update(broadcast, x):
        # ONE client. Returns (kept per client, summed over clients).
        params, hp = broadcast
        data, key, weight, count = x
        lr = hp["client_lr"] * hp["decay"] ** count
        result = schedule.train(loss_fn, params, data, key, lr)
        return result.mean_loss(), aggregation.weighted_delta(result.params, params, weight)

    def round_fn(state, train, key, cohort=None):
        # Checks, then the cohort (sampled, or the given ids), its data [S, N, ...],
        # its clients' keys and example counts n [S].
        cohort, data, keys, n = round_lib.start(
            key, train, clients_per_round, cohort,
            state_clients=state.participations.shape[0])
        counts = cohort.take(state.participations)    # [S]
        losses, (delta_sum, weight_sum) = ex.map_reduce(
            client_update, (state.params, state.hparams), (data, keys, n, counts), execution)
        params = optax.apply_updates(state.params, aggregation.safe_div(delta_sum, weight_sum))
        participations = cohort.put(state.participations, counts + 1)  # other rows unchanged
        metrics = {"train_loss": round_lib.mean_loss(losses, n)}
        return state.replace(round=state.round + 1, params=params,
                             participations=participations), metrics

    def evaluate(state, train, test):
        del train  # one global model: no personalization step
        return ex.map_clients(lambda p, d: local.evaluate_client(model, p, d), state.params,
                              test, execution)

    return FederatedAlgorithm(init, round_fn, evaluate)


def main(rounds: int = 20) -> None:
    """Registers `fedavg_decay`, runs it on synthetic data and prints the evaluations."""
    import fedjax_pfl as fp

    fp.ALGORITHMS["fedavg_decay"] = fedavg_decay  # now fp.sweep and fedjax_pfl.cli.main see it
    train, test, info = fp.data.federated_dataset("synthetic", num_clients=20, seed=0)
    model = fp.models.mlp(info["input_shape"], info["num_classes"])
    algo = fp.ALGORITHMS["fedavg_decay"](model, clients_per_round=5, local_steps=10,
                                         client_lr=0.1, decay=0.9)
    result = fp.simulate(algo, train, test, rounds=rounds, eval_every=5, progress=False)
    evals = result.to_dataframe().dropna(subset=["acc_weighted"])
    columns = ["round", "train_loss", "acc_weighted", "acc_mean", "acc_min"]
    print(evals[columns].to_string(index=False))


if __name__ == "__main__":
    main()
