"""Test helpers: plain per-client reference loops, a smoke checker, tiny fixtures.

`naive_round(name, model, state, train, key, **config)` recomputes one round
of a registered algorithm the slow, obvious way: a Python loop over the
cohort, one client at a time (each client's `local_train` is unvectorized),
and the aggregation written out in float64 NumPy. The vectorized round must
match it; that is what proves vmap / chunking / sharding and the aggregation
maths correct.
"""

from __future__ import annotations

import functools
import inspect

import jax
import jax.numpy as jnp
import numpy as np
import optax

from fedjax_pfl.algorithms import ALGORITHMS
from fedjax_pfl.algorithms.fedavg import fedavg
from fedjax_pfl.core import local, sampling
from fedjax_pfl.data.client_data import ClientData
from fedjax_pfl.models.model import Model


def resolved_config(name: str, **config) -> dict:
    """The factory's keyword arguments with defaults filled in (incl. fedavg's)."""
    out = {}
    for factory in (fedavg, ALGORITHMS[name]):
        for p in inspect.signature(factory).parameters.values():
            if p.kind is p.KEYWORD_ONLY:
                out[p.name] = p.default
    out.update(config)
    return out


def client_row(data: ClientData, i: int) -> ClientData:
    """Client i of `data` as a single-client row (leaves [N, ...])."""
    return jax.tree.map(lambda a: a[i], data)


def _cohort(train, key, cohort_size):
    sample_key, client_key = sampling.round_keys(key)
    ids = np.asarray(sampling.sample_cohort(sample_key, train.num_clients, cohort_size))
    return ids, client_key


@functools.lru_cache(maxsize=64)
def _client_trainer(model, batch_size, local_steps, local_epochs, optimizer, proximal):
    """ONE client's local training, jitted (no vmap): the loop calls it per client."""
    schedule = local.LocalSchedule(batch_size, local_steps, local_epochs, optimizer)
    loss_fn = local.model_loss_fn(model)

    def train(params, row, key, lr, mu, anchor):
        penalty = None
        if proximal:
            penalty = lambda p: 0.5 * mu * sum(
                jnp.sum((a - b) ** 2) for a, b in zip(jax.tree.leaves(p), jax.tree.leaves(anchor)))
        return schedule.train(loss_fn, params, row, key, lr, penalty)

    return jax.jit(train)


def _train_one(model, cfg, params, row, key, lr, mu=None, anchor=None):
    trainer = _client_trainer(model, cfg["batch_size"], cfg["local_steps"], cfg["local_epochs"],
                              cfg["client_optimizer"], mu is not None)
    return trainer(params, row, key, lr, 0.0 if mu is None else mu, anchor)


def _f64(tree):
    return jax.tree.map(lambda a: np.asarray(a, np.float64), tree)


def _naive_fedavg(model, state, train, key, cfg):
    ids, client_key = _cohort(train, key, cfg["clients_per_round"])
    hp = {k: float(v) for k, v in state.hparams.items()}
    server = state.params
    total, weight_sum, loss_num, n_sum = None, 0.0, 0.0, 0.0
    for i in ids:
        result = _train_one(model, cfg, server, client_row(train, i),
                            jax.random.fold_in(client_key, i), hp["client_lr"], hp.get("mu"), server)
        n = float(train.num_examples[i])
        w = n if cfg["weighting"] == "num_examples" else float(n > 0)
        delta = jax.tree.map(lambda c, s: w * (c - s), _f64(result.params), _f64(server))
        total = delta if total is None else jax.tree.map(np.add, total, delta)
        weight_sum += w
        loss_num += n * float(result.mean_loss())
        n_sum += n
    mean = jax.tree.map(lambda d: d / weight_sum if weight_sum > 0 else 0 * d, total)
    opt = local.make_optimizer(cfg["server_optimizer"], hp["server_lr"])
    updates, opt_state = opt.update(jax.tree.map(lambda d: -jnp.asarray(d, jnp.float32), mean),
                                    state.opt_state, server)
    new = state.replace(round=state.round + 1, params=optax.apply_updates(server, updates),
                        opt_state=opt_state)
    return new, {"train_loss": loss_num / max(n_sum, 1.0)}


def _naive_local(model, state, train, key, cfg):
    ids, client_key = _cohort(train, key, cfg["clients_per_round"])
    lr = float(state.hparams["client_lr"])
    rows = [_f64(client_row(state.client_params, i)) for i in range(train.num_clients)]
    loss_num, n_sum = 0.0, 0.0
    for i in ids:
        own = client_row(state.client_params, i)
        result = _train_one(model, cfg, own, client_row(train, i),
                            jax.random.fold_in(client_key, i), lr)
        rows[i] = _f64(result.params)
        n = float(train.num_examples[i])
        loss_num += n * float(result.mean_loss())
        n_sum += n
    stacked = jax.tree.map(lambda *r: jnp.asarray(np.stack(r), jnp.float32), *rows)
    new = state.replace(round=state.round + 1, client_params=stacked)
    return new, {"train_loss": loss_num / max(n_sum, 1.0)}


NAIVE_ROUNDS = {
    "fedavg": _naive_fedavg,
    "fedprox": _naive_fedavg,
    "fedavg_ft": _naive_fedavg,
    "local": _naive_local,
}


def naive_round(name: str, model: Model, state, train: ClientData, key: jax.Array, **config):
    """One round of algorithm `name` as a plain per-client Python loop.

    Args:
      name: a key of `ALGORITHMS` with a reference in `NAIVE_ROUNDS`.
      model: the model the algorithm was built with.
      state: the state before the round.
      train: the training data.
      key: the round key (as passed to `algorithm.round`).
      **config: the keyword arguments the algorithm was built with.

    Returns:
      (new state, round metrics), to compare with `algorithm.round`.
    """
    if name not in NAIVE_ROUNDS:
        raise KeyError(f"name: no naive reference for {name!r}; known: {sorted(NAIVE_ROUNDS)}.")
    return NAIVE_ROUNDS[name](model, state, train, key, resolved_config(name, **config))


def random_client_data(seed: int, num_clients: int, *, sample_seed: int = 0,
                       num_features: int = 6, num_classes: int = 3, max_examples: int = 20,
                       empty: tuple[int, ...] = ()) -> ClientData:
    """Tiny non-IID classification data with unequal sizes (clients in `empty` get 0).

    Client i's task (a random linear labelling) depends on (seed, i) only, so
    calls that differ in `sample_seed` give train and test sets of the same
    clients.
    """
    clients = []
    for i in range(num_clients):
        w = np.random.default_rng([seed, i]).normal(size=(num_features, num_classes))
        rng = np.random.default_rng([seed, i, sample_seed + 1])
        n = 0 if i in empty else int(rng.integers(1, max_examples + 1))
        x = rng.normal(size=(n, num_features)).astype(np.float32)
        clients.append({"x": x, "y": np.argmax(x @ w, 1).astype(np.int32)})
    return ClientData.from_clients(clients, num_classes=num_classes)


def assert_trees_close(a, b, *, rtol: float = 1e-5, atol: float = 1e-5) -> None:
    """Same structure and allclose leaves (float64 comparison)."""
    assert jax.tree.structure(a) == jax.tree.structure(b), (jax.tree.structure(a),
                                                             jax.tree.structure(b))
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_allclose(np.asarray(x, np.float64), np.asarray(y, np.float64),
                                   rtol=rtol, atol=atol)


def check_algorithm_does_not_smoke(algorithm, train: ClientData, test: ClientData,
                                   rounds: int = 2, seed: int = 0) -> None:
    """One-call check: init, jitted rounds preserving the state's shapes, finite evaluate."""
    state = algorithm.init(jax.random.key(seed), train)
    round_fn = jax.jit(algorithm.round)
    spec = jax.eval_shape(lambda s: s, state)
    for r in range(rounds):
        state, metrics = round_fn(state, train, jax.random.fold_in(jax.random.key(seed + 1), r))
        assert jax.eval_shape(lambda s: s, state) == spec, "round changed the state's shapes"
        assert np.all(np.isfinite(np.asarray(metrics["train_loss"]))), metrics
    per_client = jax.jit(algorithm.evaluate)(state, train, test)
    for k, v in per_client.items():
        assert np.shape(v) == (train.num_clients,), (k, np.shape(v))
        assert np.all(np.isfinite(np.asarray(v))), k
