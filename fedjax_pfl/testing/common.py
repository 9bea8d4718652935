"""Shared pieces of the naive references and of the test suite."""

from __future__ import annotations

import jax
import numpy as np

from fedjax_pfl.core import sampling
from fedjax_pfl.data.client_data import ClientData
from fedjax_pfl.testing import local_reference


def client_row(data: ClientData, i: int) -> ClientData:
    """Client i of `data` as a single-client row (leaves [N, ...])."""
    return jax.tree.map(lambda a: a[i], data)


def cohort(train: ClientData, key: jax.Array, cohort_size: int | None):
    """The round's cohort ids (NumPy) and the base key of its clients' keys.

    Client i's key is `fold_in(client_key, i)`: the package's randomness contract.
    """
    sample_key, client_key = sampling.round_keys(key)
    ids = np.asarray(sampling.sample_cohort(sample_key, train.num_clients, cohort_size))
    return ids, client_key


class Clients:
    """Every client's examples as NumPy arrays: `examples(i)` -> {field: [N, ...]}, `n[i]`."""

    def __init__(self, train: ClientData):
        self._examples = {k: np.asarray(v) for k, v in train.examples.items()}
        self.n = [int(v) for v in np.asarray(train.num_examples)]
        self.max_examples = train.max_examples

    def examples(self, i: int) -> dict:
        return {k: v[i] for k, v in self._examples.items()}


def train_one(model, cfg: dict, params, row: ClientData, key: jax.Array, lr: float,
              mu: float | None = None, anchor=None) -> local_reference.Run:
    """ONE client's plain-SGD run on a single-client `row` with `cfg`'s schedule
    (plus the proximal term mu/2 ||w - anchor||^2 when `mu` is given)."""
    local_reference.check_sgd(cfg)
    schedule = local_reference.Schedule.of(cfg["batch_size"], cfg["local_steps"],
                                           cfg["local_epochs"])
    examples = {k: np.asarray(v) for k, v in row.examples.items()}
    prox = None
    if mu is not None:
        prox = lambda p: local_reference.sq_dist_grad(mu, p, local_reference.as_numpy(anchor))
    return local_reference.train_model(model, params, examples, int(row.num_examples), key,
                                       schedule, lr, prox)


def stacked_row(tree, i: int):
    """Row i of a stacked [M, ...] (or [K, ...]) pytree, as NumPy float32."""
    return jax.tree.map(lambda a: np.asarray(a[i], np.float32), tree)


def stack(rows):
    """Stacks per-client (or per-model) pytrees on a new leading axis, float32."""
    return jax.tree.map(lambda *r: np.stack([np.asarray(x, np.float32) for x in r]), *rows)


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
