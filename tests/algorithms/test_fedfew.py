"""FedFew and IFCA: weights, reductions, symmetry, evaluation protocols, argument checks.

The conformance suite (test_common.py) already checks both against their
naive per-client loops with default settings; here the other code paths.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedjax_pfl import models, testing
from fedjax_pfl.algorithms import fedavg, fedfew, ifca
from fedjax_pfl.algorithms._fedfew_dense import dense_fedfew_round
from fedjax_pfl.algorithms.fedfew import stch_weights
from fedjax_pfl.core.execution import Execution
from fedjax_pfl.data.client_data import ClientData
from fedjax_pfl.testing.common import client_row, train_one
from fedjax_pfl.testing.naive_kmodels import stch_weights_reference

MODEL = models.mlp((6,), 3, hidden=(8,))
KEY = jax.random.key(3)


def equal_sized(num_clients=4, n=8, seed=0):
    rng = np.random.default_rng(seed)
    clients = []
    for i in range(num_clients):
        x = rng.normal(size=(n, 6)).astype(np.float32)
        clients.append({"x": x, "y": ((x[:, 0] + i) > 0).astype(np.int32) + (i % 2)})
    return ClientData.from_clients(clients, num_classes=3)


# ----------------------------------------------------------------------------- weights

@pytest.mark.parametrize("mu", [1e-3, 1e-2, 1.0])
@pytest.mark.parametrize("scale", [1.0, 1e3])
def test_weights_equal_numpy_transcription_and_are_normalised(mu, scale):
    rng = np.random.default_rng(0)
    losses = rng.uniform(0, scale, size=(7, 3)).astype(np.float32)
    n = np.array([5, 0, 12, 1, 30, 7, 2])
    w, alpha = jax.jit(stch_weights)(jnp.asarray(losses), jnp.asarray(n), mu)
    w, alpha = np.asarray(w, np.float64), np.asarray(alpha, np.float64)
    assert np.all(np.isfinite(w)) and np.all(np.isfinite(alpha))
    np.testing.assert_allclose(w.sum(1), 1.0, atol=1e-5)
    np.testing.assert_allclose(alpha.sum(), 1.0, atol=1e-5)
    assert alpha[1] == 0.0  # the empty client
    w_ref, alpha_ref = stch_weights_reference(losses, n, mu)
    np.testing.assert_allclose(w, w_ref, atol=1e-5)
    np.testing.assert_allclose(alpha, alpha_ref, atol=1e-5)


def test_weights_equal_the_direct_formula():
    """Where plain exponentials do not overflow:
    w = e^{-x/mu} / S_i and alpha = S_i^-1 / sum_j S_j^-1."""
    rng = np.random.default_rng(1)
    losses = rng.uniform(0, 3, size=(5, 4))
    n = np.array([3.0, 9.0, 4.0, 1.0, 6.0])
    mu = 0.05
    e = np.exp(-losses * (n / n.sum())[:, None] / mu)
    s = e.sum(1)
    w, alpha = stch_weights(jnp.asarray(losses, jnp.float32), jnp.asarray(n), mu)
    np.testing.assert_allclose(w, e / s[:, None], rtol=1e-5)
    np.testing.assert_allclose(alpha, (1 / s) / (1 / s).sum(), rtol=1e-5)


def test_weights_favour_low_loss_models_and_hard_clients():
    losses = jnp.array([[0.1, 2.0], [3.0, 3.5]])
    w, alpha = stch_weights(losses, jnp.array([10, 10]), 0.1)
    assert w[0, 0] > 0.99 and w[1, 0] > w[1, 1]
    assert alpha[1] > 0.99  # the client that every model serves badly dominates


@pytest.mark.slow
# ----------------------------------------------------------------------------- FedFew

@pytest.mark.parametrize("config", [
    {"loss_at": "received", "init": "independent"},
    {"per_model_orders": False, "num_models": 2, "mu": 1.0, "local_steps": 3},
], ids=["received+independent", "shared-orders"])
def test_fedfew_other_paths_equal_naive_loop(tiny_train, config):
    config = {"batch_size": 4, "local_epochs": 1, "client_lr": 0.1, "clients_per_round": 6,
              **config}
    if "local_steps" in config:
        config["local_epochs"] = None
    algo = fedfew(MODEL, **config)
    state = algo.init(jax.random.key(0), tiny_train)
    want, want_m = testing.naive_round("fedfew", MODEL, state, tiny_train, KEY, **config)
    got, got_m = jax.jit(algo.round)(state, tiny_train, KEY)
    testing.assert_trees_close(got, want, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(got_m["train_loss"], want_m["train_loss"], rtol=1e-5)


STREAM_CFG = {"num_models": 3, "batch_size": 4, "local_steps": 1, "client_lr": 0.2,
              "init": "independent", "diagnostics": True}


@pytest.mark.parametrize("execution", [
    Execution("vmap"), Execution("chunked", chunk_size=4),
    pytest.param(Execution("sharded", chunk_size=2), marks=pytest.mark.slow)],
    ids=["vmap", "chunked", "sharded"])
def test_streamed_round_equals_the_dense_one(tiny_train, execution):
    """The round streams sum_i alpha_i w_ik delta_ik through map_reduce; it must equal
    the old dense form (every delta kept, weights from all the losses): with the
    empty clients 3 and 8 in the cohort, for mu so small that e^{-x/mu} underflows
    (1e-6: exponents ~1e5), and when no client has data (no update)."""
    algo = fedfew(MODEL, execution=execution, **STREAM_CFG)
    dense = dense_fedfew_round(MODEL, execution=execution, **STREAM_CFG)
    both = jax.jit(lambda s, t: (algo.round(s, t, KEY), dense(s, t, KEY)))  # one compile
    state = algo.init(jax.random.key(0), tiny_train)
    no_data = tiny_train.replace(num_examples=jnp.zeros_like(tiny_train.num_examples))
    for mu, train in [(0.1, tiny_train), (1e-6, tiny_train), (0.1, no_data)]:
        st = state.replace(hparams={**state.hparams, "mu": jnp.float32(mu)})
        (got, metrics), (params, _, losses) = both(st, train)
        testing.assert_trees_close(got.params, params, rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(metrics["diagnostics"]["losses"], losses, rtol=1e-6)
        assert all(np.all(np.isfinite(a)) for a in jax.tree.leaves(got.params))
        if train is no_data:
            testing.assert_trees_close(got.params, st.params, rtol=0, atol=0)


def test_fedfew_with_one_model_and_large_mu_is_unweighted_fedavg():
    """K=1, equal n_i, mu -> inf: alpha_i -> 1/S and w = 1, so the update is the plain mean.
    One full batch per epoch makes the minibatch order irrelevant (the keys differ)."""
    train = equal_sized()
    cfg = {"batch_size": 8, "local_epochs": 2, "client_lr": 0.3}
    few = fedfew(MODEL, num_models=1, mu=1e6, **cfg)
    avg = fedavg(MODEL, weighting="uniform", **cfg)
    s_few = few.init(jax.random.key(0), train)
    s_avg = avg.init(jax.random.key(0), train)
    testing.assert_trees_close(jax.tree.map(lambda a: a[0], s_few.params), s_avg.params)
    for r in range(2):
        s_few, _ = jax.jit(few.round)(s_few, train, jax.random.fold_in(KEY, r))
        s_avg, _ = jax.jit(avg.round)(s_avg, train, jax.random.fold_in(KEY, r))
    testing.assert_trees_close(jax.tree.map(lambda a: a[0], s_few.params), s_avg.params,
                               rtol=1e-5, atol=1e-6)


def _spread(params):
    return max(float(jnp.max(jnp.abs(a - a[:1]))) for a in jax.tree.leaves(params))


@pytest.mark.slow
def test_shared_init_copies_stay_identical_without_per_model_orders(tiny_train):
    """Why each model needs its own minibatch order: with one init and one order the K
    copies get identical updates and identical weights w_ik = 1/K, so they never split."""
    cfg = {"batch_size": 4, "local_steps": 3, "client_lr": 0.1}
    same = fedfew(MODEL, per_model_orders=False, **cfg)
    own = fedfew(MODEL, **cfg)
    s_same = same.init(jax.random.key(0), tiny_train)
    s_own = own.init(jax.random.key(0), tiny_train)
    assert _spread(s_same.params) == 0.0
    for r in range(3):
        s_same, _ = jax.jit(same.round)(s_same, tiny_train, jax.random.fold_in(KEY, r))
        s_own, _ = jax.jit(own.round)(s_own, tiny_train, jax.random.fold_in(KEY, r))
    assert _spread(s_same.params) == 0.0
    assert _spread(s_own.params) > 1e-4


EVAL_CFG = {"batch_size": 4, "local_steps": 3, "client_lr": 0.2, "init": "independent",
            "clients_per_round": 6}


@functools.cache
def _protocol(eval_protocol):
    algo = fedfew(MODEL, eval_protocol=eval_protocol, **EVAL_CFG)
    return algo, jax.jit(algo.round), jax.jit(algo.evaluate)


@pytest.mark.slow  # fast-tier budget: runs in the slow tier (CI runs both)
def test_fedfew_evaluation_protocols(tiny_train, tiny_test):
    server, round_fn, evaluate = _protocol("server")
    state = server.init(jax.random.key(0), tiny_train)
    state, _ = round_fn(state, tiny_train, KEY)
    got = evaluate(state, tiny_train, tiny_test)
    local_got = _protocol("local")[2](state, tiny_train, tiny_test)
    ids, client_key = testing.common.cohort(tiny_train, KEY, 6)
    config = testing.resolved_config("fedfew", **EVAL_CFG)
    apply = jax.jit(MODEL.apply)
    for i in range(tiny_train.num_clients):
        row, test_row = client_row(tiny_train, i), client_row(tiny_test, i)
        server_models = [jax.tree.map(lambda a, k=k: a[k], state.params) for k in range(3)]
        received = [jax.tree.map(lambda a, k=k: a[k], state.last_params) for k in range(3)]
        if i in ids:  # the copies client i trained in that round, recomputed one by one
            key_i = jax.random.fold_in(client_key, i)
            copies = [train_one(MODEL, config, received[k], row, jax.random.fold_in(key_i, k),
                                0.2).params for k in range(3)]
        else:
            copies = received
        for out, candidates in ((got, server_models), (local_got, copies)):
            losses = [testing.naive_kmodels._mean_loss(MODEL, p, row) for p in candidates]
            best = int(np.argmin(losses))
            if np.sort(losses)[1] - np.min(losses) < 1e-5:
                continue  # a near tie: either choice is right
            assert int(out["model"][i]) == best, (i, losses)
            logits = apply(candidates[best], test_row.examples, None)
            n = int(test_row.num_examples)
            y = np.asarray(test_row.examples["y"])
            assert int(out["num_correct"][i]) == int(np.sum((np.argmax(logits, -1) == y)[:n]))


def test_local_protocol_before_any_round_equals_server(tiny_train, tiny_test):
    state = _protocol("server")[0].init(jax.random.key(0), tiny_train)
    testing.assert_trees_close(_protocol("server")[2](state, tiny_train, tiny_test),
                               _protocol("local")[2](state, tiny_train, tiny_test))


# ----------------------------------------------------------------------------- IFCA

def test_ifca_with_one_model_is_fedavg(tiny_train):
    cfg = {"batch_size": 4, "local_steps": 3, "client_lr": 0.1, "clients_per_round": 6}
    one, avg = ifca(MODEL, num_models=1, **cfg), fedavg(MODEL, **cfg)
    s_one = one.init(jax.random.key(0), tiny_train)
    s_avg = avg.init(jax.random.key(0), tiny_train).replace(
        params=jax.tree.map(lambda a: a[0], s_one.params))
    for r in range(2):
        s_one, m_one = jax.jit(one.round)(s_one, tiny_train, jax.random.fold_in(KEY, r))
        s_avg, m_avg = jax.jit(avg.round)(s_avg, tiny_train, jax.random.fold_in(KEY, r))
    testing.assert_trees_close(jax.tree.map(lambda a: a[0], s_one.params), s_avg.params,
                               rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(m_one["train_loss"], m_avg["train_loss"], rtol=1e-6)


def test_ifca_model_nobody_picks_is_unchanged(tiny_train):
    algo = ifca(MODEL, batch_size=4, local_steps=3)
    state = algo.init(jax.random.key(0), tiny_train)
    bad = jax.tree.map(lambda a: a, state.params)  # model 2: huge random logits, high loss
    bad["head"]["kernel"] = bad["head"]["kernel"].at[2].multiply(100.0)
    state = state.replace(params=bad)
    new, _ = jax.jit(algo.round)(state, tiny_train, KEY)
    picks = np.asarray(jax.jit(algo.evaluate)(state, tiny_train, tiny_train)["model"])
    assert 2 not in picks[np.asarray(tiny_train.num_examples) > 0]
    for before, after in zip(jax.tree.leaves(state.params), jax.tree.leaves(new.params)):
        np.testing.assert_array_equal(before[2], after[2])
        assert not np.array_equal(before[:2], after[:2])


def test_ifca_shared_init_is_fedavg(tiny_train):
    cfg = {"batch_size": 4, "local_steps": 3, "client_lr": 0.1}
    algo, avg = ifca(MODEL, init="shared", **cfg), fedavg(MODEL, **cfg)
    s, s_avg = algo.init(jax.random.key(0), tiny_train), avg.init(jax.random.key(0), tiny_train)
    s, _ = jax.jit(algo.round)(s, tiny_train, KEY)
    s_avg, _ = jax.jit(avg.round)(s_avg, tiny_train, KEY)
    testing.assert_trees_close(jax.tree.map(lambda a: a[0], s.params), s_avg.params, atol=1e-6)
    testing.assert_trees_close(jax.tree.map(lambda a: a[1], s.params),
                               avg.init(jax.random.key(0), tiny_train).params)


# ----------------------------------------------------------------------------- arguments

@pytest.mark.parametrize("factory,kwargs,name", [
    (fedfew, {"num_models": 0}, "num_models"),
    (fedfew, {"mu": 0.0}, "mu"),
    (fedfew, {"loss_at": "first"}, "loss_at"),
    (fedfew, {"init": "random"}, "init"),
    (fedfew, {"eval_protocol": "best"}, "eval_protocol"),
    (fedfew, {"per_model_orders": 1}, "per_model_orders"),
    (fedfew, {"client_lr": -1.0}, "client_lr"),
    (ifca, {"num_models": True}, "num_models"),
    (ifca, {"init": "random"}, "init"),
    (ifca, {"server_optimizer": "nope"}, "server_optimizer"),
])
def test_bad_arguments_raise_naming_them(factory, kwargs, name):
    with pytest.raises(ValueError, match=name):
        factory(MODEL, **kwargs)
