"""Shared pieces of the naive references and of the test suite."""

from __future__ import annotations

import functools
import inspect

import jax
import jax.numpy as jnp
import numpy as np

from fedjax_pfl.algorithms import ALGORITHMS
from fedjax_pfl.algorithms.fedavg import fedavg
from fedjax_pfl.core import local, sampling
from fedjax_pfl.data.client_data import ClientData


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


def cohort(train, key, cohort_size):
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


def train_one(model, cfg, params, row, key, lr, mu=None, anchor=None):
    trainer = _client_trainer(model, cfg["batch_size"], cfg["local_steps"], cfg["local_epochs"],
                              cfg["client_optimizer"], mu is not None)
    return trainer(params, row, key, lr, 0.0 if mu is None else mu, anchor)


def f64(tree):
    return jax.tree.map(lambda a: np.asarray(a, np.float64), tree)


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
        assert np.shape(v)[:1] == (train.num_clients,), (k, np.shape(v))
        assert np.all(np.isfinite(np.asarray(v))), k
