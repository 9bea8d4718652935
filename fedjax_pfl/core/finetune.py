"""The fine-tuning curve: test a global model after nu' local SGD steps, for every nu'.

Personalized FL methods with a global model (FedAvg-FT, Per-FedAvg, nu-step
meta-FL) are deployed by letting each client fine-tune the model for nu'
steps of plain SGD with step alpha on its own training data, then testing it.
`finetune_client` runs those steps for ONE client as one `lax.scan` and tests
the model before every step and after the last one, so a single compiled call
gives the whole curve nu' = 0..nu_max (the engine vmaps it over clients).

Minibatch mode draws each step's B indices uniformly with replacement in
[0, n_i) (as `local.batch_plan` in step mode); full-batch mode takes the
gradient of the mean loss over all n_i training rows. A client without
training examples keeps the global model (every step is a no-op).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from fedjax_pfl.core import algorithm, local, sampling
from fedjax_pfl.core import execution as ex
from fedjax_pfl.data.client_data import ClientData, client_capacity, client_rows
from fedjax_pfl.models.model import Model


def check_curve_args(max_steps, report_step, batch_size, prefix: str = "eval_") -> None:
    """Validates the static fine-tuning-curve settings (names carry `prefix`)."""
    is_int = lambda v: isinstance(v, int) and not isinstance(v, bool)
    algorithm.check_arg(f"{prefix}max_steps", max_steps, is_int(max_steps) and max_steps >= 0,
                        "an int >= 0")
    algorithm.check_arg(f"{prefix}steps", report_step,
                        is_int(report_step) and 0 <= report_step <= max_steps,
                        f"an int in [0, {prefix}max_steps={max_steps}]")
    algorithm.check_arg(f"{prefix}batch_size", batch_size, is_int(batch_size) and batch_size >= 1,
                        "an int >= 1")


def finetune_client(model: Model, params, train_row: ClientData, test_row: ClientData,
                    key: jax.Array, lr, *, max_steps: int, report_step: int, batch_size: int,
                    full_batch: bool = False) -> dict[str, jax.Array]:
    """Fine-tuning curve of ONE client.

    Args:
      model: the model.
      params: the starting (global) params.
      train_row: the client's training rows (leaves [N, ...]).
      test_row: the client's test rows.
      key: the client's key (minibatch indices).
      lr: the fine-tuning step alpha (may be traced).
      max_steps: nu_max (static).
      report_step: the nu' whose statistics fill the scalar keys (static).
      batch_size: B of minibatch mode.
      full_batch: use the full local gradient instead of minibatches.

    Returns:
      `num_examples`, `num_correct`, `loss_sum` (scalars, after `report_step`
      steps) and `curve_num_correct`, `curve_loss_sum` ([nu_max + 1]: entry j is
      after j steps).
    """
    loss_fn = local.model_loss_fn(model)
    rows = client_capacity(train_row)
    n = train_row.num_examples
    if full_batch:
        idx = jnp.broadcast_to(jnp.arange(rows, dtype=jnp.int32), (max_steps, rows))
        weights = jnp.where(jnp.arange(rows) < n, 1.0 / jnp.maximum(n, 1), 0.0)
        weights = jnp.broadcast_to(weights.astype(jnp.float32), (max_steps, rows))
    else:
        idx, weights = local.batch_plan(key, n, rows, batch_size=batch_size,
                                        local_steps=max_steps)

    def step(p, xs):
        i, w = xs
        stats = local.evaluate_client(model, p, test_row)
        batch = client_rows(train_row, i)
        grads = jax.grad(lambda q: jnp.sum(w * loss_fn(q, batch, None)))(p)
        return jax.tree.map(lambda a, g: a - lr * g, p, grads), stats

    tuned, stats = jax.lax.scan(step, params, (idx, weights))
    last = local.evaluate_client(model, tuned, test_row)
    curve = jax.tree.map(lambda s, e: jnp.concatenate([s, e[None]]), stats, last)
    return {
        "num_examples": last["num_examples"],
        "num_correct": curve["num_correct"][report_step],
        "loss_sum": curve["loss_sum"][report_step],
        "curve_num_correct": curve["num_correct"],
        "curve_loss_sum": curve["loss_sum"],
    }


def finetune_evaluate(model: Model, params, train: ClientData, test: ClientData, lr, *,
                      max_steps: int, report_step: int, batch_size: int,
                      full_batch: bool = False, seed: int = 0,
                      execution: ex.Execution | None = None) -> dict[str, jax.Array]:
    """`finetune_client` for every client: per-client statistics [M] and curves [M, nu_max+1].

    Client i draws its minibatches from `fold_in(key(seed), i)`, the same at
    every evaluation, so curves of different rounds and algorithms use the same
    fine-tuning batches.
    """
    algorithm.check_same_clients(train.num_clients, test, "test")
    keys = sampling.client_keys(jax.random.key(seed), jnp.arange(train.num_clients))

    def client(broadcast, x):
        p, step_size = broadcast
        train_row, test_row, k = x
        return finetune_client(model, p, train_row, test_row, k, step_size, max_steps=max_steps,
                               report_step=report_step, batch_size=batch_size,
                               full_batch=full_batch)

    return ex.map_clients(client, (params, lr), (train, test, keys), execution or ex.Execution())


def evaluate_tuned(model: Model, tune, broadcast, train: ClientData, test: ClientData, seed: int,
                   execution: ex.Execution) -> dict[str, jax.Array]:
    """Per-client [M] test statistics of `tune(broadcast, train_row, key) -> params`.

    Client i's fine-tuning key is `fold_in(key(seed), i)`, the same at every
    evaluation (FedAvg-FT, FedBABU).
    """
    algorithm.check_same_clients(train.num_clients, test, "test")
    keys = sampling.client_keys(jax.random.key(seed), jnp.arange(train.num_clients))

    def client(b, x):
        train_row, test_row, key = x
        return local.evaluate_client(model, tune(b, train_row, key), test_row)

    return ex.map_clients(client, broadcast, (train, test, keys), execution)
