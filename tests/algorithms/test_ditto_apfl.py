"""Ditto and APFL: reductions to FedAvg, the alpha gradient, Ditto's personal
schedule, argument checks.

Equality with the naive per-client loops (also with `personal_steps` /
`personal_epochs` set) runs in test_common.py.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedjax_pfl import models, testing
from fedjax_pfl.algorithms import apfl, ditto, fedavg

MODEL = models.mlp((6,), 3, hidden=(8,))
KEY = jax.random.key(5)
CFG = {"batch_size": 4, "local_steps": 3, "client_lr": 0.1, "clients_per_round": 6}


@pytest.mark.slow
@pytest.mark.parametrize("factory", [ditto, apfl], ids=["ditto", "apfl"])
def test_global_model_follows_fedavg(tiny_train, factory):
    """Neither the personal models nor alpha feed back into the global copy."""
    algo, avg = factory(MODEL, **CFG), fedavg(MODEL, **CFG)
    s, s_avg = algo.init(jax.random.key(0), tiny_train), avg.init(jax.random.key(0), tiny_train)
    for r in range(2):
        s, m = jax.jit(algo.round)(s, tiny_train, jax.random.fold_in(KEY, r))
        s_avg, m_avg = jax.jit(avg.round)(s_avg, tiny_train, jax.random.fold_in(KEY, r))
    testing.assert_trees_close(s.params, s_avg.params, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(m["train_loss"], m_avg["train_loss"], rtol=1e-6)


@pytest.mark.parametrize("schedule", [{"local_steps": 1}, {"local_steps": 3, "personal_steps": 1}],
                         ids=["one-local-step", "personal_steps=1"])
def test_ditto_personal_step_has_the_proximal_pull(tiny_train, schedule):
    """One personal SGD step: v' = v - eta (grad f(v) + lambda (v - w)). With the same
    minibatch, lambda = 10 and eta = 0.1 differ from lambda = 0 by exactly w - v
    (also when the global copy takes 3 steps and `personal_steps=1`)."""
    cfg = {**CFG, **schedule, "personal_lr": 0.1}
    pulled, free = ditto(MODEL, lam=10.0, **cfg), ditto(MODEL, lam=0.0, **cfg)
    state = pulled.init(jax.random.key(0), tiny_train)
    other = MODEL.init(jax.random.key(9))
    state = state.replace(client_params=jax.tree.map(
        lambda a, v: jnp.broadcast_to(v, a.shape), state.client_params, other))
    a, _ = jax.jit(pulled.round)(state, tiny_train, KEY)
    b, _ = jax.jit(free.round)(state.replace(hparams={**state.hparams, "lam": jnp.float32(0)}),
                               tiny_train, KEY)
    ids = np.asarray(testing.common.cohort(tiny_train, KEY, 6)[0])
    has = np.zeros(tiny_train.num_clients, bool)
    has[ids] = np.asarray(tiny_train.num_examples)[ids] > 0
    for pa, pb, w, v in zip(*map(jax.tree.leaves, (a.client_params, b.client_params,
                                                   state.params, other))):
        diff = np.asarray(pa) - np.asarray(pb)
        np.testing.assert_allclose(diff[has], np.broadcast_to(w - v, diff[has].shape), atol=1e-5)
        np.testing.assert_array_equal(diff[~has], 0.0)


def _ditto_round(tiny_train, **kwargs):
    algo = ditto(MODEL, **{**CFG, **kwargs})
    state = algo.init(jax.random.key(0), tiny_train)
    return state, jax.jit(algo.round)(state, tiny_train, KEY)


@pytest.mark.parametrize("schedule,personal", [
    ({"local_steps": 3}, {"personal_steps": 3}),
    ({"local_steps": None, "local_epochs": 2}, {"personal_epochs": 2})], ids=["steps", "epochs"])
def test_ditto_personal_schedule_defaults_to_the_local_one(tiny_train, schedule, personal):
    """personal_steps / personal_epochs = None is the global copy's schedule, bit for bit."""
    _, default = _ditto_round(tiny_train, **schedule)
    _, explicit = _ditto_round(tiny_train, **schedule, **personal)
    testing.assert_trees_close(default, explicit, rtol=0, atol=0)


@pytest.mark.parametrize("personal", [{"personal_steps": 7}, {"personal_epochs": 1}])
def test_ditto_personal_schedule_changes_only_the_personal_models(tiny_train, personal):
    state, (default, m_default) = _ditto_round(tiny_train)
    _, (other, m_other) = _ditto_round(tiny_train, **personal)
    # the global model (FedAvg) and its loss do not depend on the personal schedule
    testing.assert_trees_close(other.params, default.params, rtol=0, atol=0)
    np.testing.assert_array_equal(m_other["train_loss"], m_default["train_loss"])
    ids = np.asarray(testing.common.cohort(tiny_train, KEY, CFG["clients_per_round"])[0])
    trained = ids[np.asarray(tiny_train.num_examples)[ids] > 0]
    untouched = np.setdiff1d(np.arange(tiny_train.num_clients), trained)
    for a, b, before in zip(*map(jax.tree.leaves, (other.client_params, default.client_params,
                                                   state.client_params))):
        assert np.all(np.max(np.abs(np.asarray(a - b)[trained]).reshape(len(trained), -1),
                             axis=1) > 1e-6)
        np.testing.assert_array_equal(np.asarray(a)[untouched], np.asarray(before)[untouched])


def test_apfl_alpha_gradient_matches_finite_differences(tiny_train):
    """One full-batch SGD step: alpha' = alpha - eta_a d/dalpha f(alpha v + (1-alpha) w)."""
    row = testing.client_row(tiny_train, 0)
    n = int(row.num_examples)
    algo = apfl(MODEL, alpha=0.4, alpha_lr=0.5, client_lr=0.1, batch_size=32, local_epochs=1)
    state = algo.init(jax.random.key(0), tiny_train)
    other = MODEL.init(jax.random.key(9))  # v != w, so the gradient is not zero
    state = state.replace(client_params=jax.tree.map(
        lambda a, v: a.at[0].set(v), state.client_params, other))
    new, _ = jax.jit(algo.round)(state, tiny_train, KEY)
    batch = jax.tree.map(lambda a: a[:n], row.examples)
    w = state.params

    def f(alpha):
        mixed = jax.tree.map(lambda v, g: alpha * v + (1 - alpha) * g, other, w)
        return float(np.mean(np.asarray(MODEL.loss(MODEL.apply(mixed, batch, None), batch),
                                        np.float64)))

    h = 1e-2
    grad_fd = (f(0.4 + h) - f(0.4 - h)) / (2 * h)
    assert abs(grad_fd) > 1e-3
    got = (0.4 - float(new.client_alpha[0])) / 0.5
    np.testing.assert_allclose(got, grad_fd, rtol=2e-3, atol=2e-5)


@pytest.mark.slow
def test_apfl_with_alpha_zero_evaluates_the_global_model(tiny_train, tiny_test):
    algo, avg = apfl(MODEL, alpha=0.0, alpha_lr=0.0, **CFG), fedavg(MODEL, **CFG)
    s, s_avg = algo.init(jax.random.key(0), tiny_train), avg.init(jax.random.key(0), tiny_train)
    s, _ = jax.jit(algo.round)(s, tiny_train, KEY)
    s_avg, _ = jax.jit(avg.round)(s_avg, tiny_train, KEY)
    got = jax.jit(algo.evaluate)(s, tiny_train, tiny_test)
    want = jax.jit(avg.evaluate)(s_avg, tiny_train, tiny_test)
    np.testing.assert_array_equal(got["alpha"], 0.0)
    testing.assert_trees_close({k: got[k] for k in want}, want, atol=1e-5)


@pytest.mark.parametrize("factory,kwargs,name", [
    (ditto, {"lam": -1.0}, "lam"),
    (ditto, {"personal_lr": "x"}, "personal_lr"),
    (ditto, {"personal_steps": 0}, "personal_steps"),
    (ditto, {"personal_steps": 2.0}, "personal_steps"),
    (ditto, {"personal_epochs": True}, "personal_epochs"),
    (ditto, {"personal_epochs": -1}, "personal_epochs"),
    (ditto, {"personal_steps": 2, "personal_epochs": 1}, "personal_steps / personal_epochs"),
    (apfl, {"alpha": 1.5}, "alpha"),
    (apfl, {"alpha_lr": -0.1}, "alpha_lr"),
    (apfl, {"local_steps": 2, "local_epochs": 1}, "local_steps"),
])
def test_bad_arguments_raise_naming_them(factory, kwargs, name):
    with pytest.raises(ValueError, match=name):
        factory(MODEL, **kwargs)
