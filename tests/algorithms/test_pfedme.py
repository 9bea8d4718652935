"""pFedMe: reductions to plain SGD, the Moreau step, the released code's options
(`train_all_clients`, `mu`), argument checks.

Equality with the per-client Python loop (`testing.naive_meta`; also with
`train_all_clients` and `mu` set), compile-once, padding and execution-strategy
invariance run in test_common.py.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedjax_pfl import models, testing
from fedjax_pfl.algorithms import pfedme
from fedjax_pfl.core import local

MODEL = models.mlp((6,), 3, hidden=(8,))
KW = dict(batch_size=4, local_steps=3, clients_per_round=None, inner_steps=2)


def test_lambda_zero_personal_models_are_local_sgd_and_global_stays(tiny_train, tiny_test):
    """With lambda = 0 the sub-problem is plain SGD on each batch (K steps per
    batch) and the local copies never move, so the global model is unchanged."""
    algo = pfedme(MODEL, lam=0.0, personal_lr=0.1, **KW)
    state = algo.init(jax.random.key(0), tiny_train)
    key = jax.random.key(3)
    new, _ = jax.jit(algo.round)(state, tiny_train, key)
    testing.assert_trees_close(new.params, state.params, rtol=0, atol=0)
    loss_fn = local.model_loss_fn(MODEL)
    client_key = jax.random.fold_in(key, 1)  # sampling.round_keys(key)[1]
    for i in (0, 1, 4):
        row = testing.client_row(tiny_train, i)
        idx, w = local.batch_plan(jax.random.fold_in(client_key, i), row.num_examples,
                                  tiny_train.max_examples, batch_size=4, local_steps=3)
        p = state.params
        for t in range(3):
            batch = jax.tree.map(lambda a, i=idx[t]: a[i], row.examples)
            for _ in range(2):
                g = jax.grad(lambda q, b=batch, w=w[t]: jnp.sum(w * loss_fn(q, b, None)))(p)
                p = jax.tree.map(lambda a, b: a - 0.1 * b, p, g)
        testing.assert_trees_close(testing.client_row(new.client_params, i), p, atol=1e-6)
    # clients without data keep their personal model
    testing.assert_trees_close(testing.client_row(new.client_params, 3),
                               testing.client_row(state.client_params, 3), rtol=0, atol=0)
    out = jax.jit(algo.evaluate)(new, tiny_train, tiny_test)
    assert out["num_correct"].shape == (tiny_train.num_clients,)


def test_beta_scales_the_server_step(tiny_train):
    one = pfedme(MODEL, beta=1.0, **KW)
    half = pfedme(MODEL, beta=0.5, **KW)
    state = one.init(jax.random.key(0), tiny_train)
    a, _ = jax.jit(one.round)(state, tiny_train, jax.random.key(1))
    b, _ = jax.jit(half.round)(state.replace(hparams={**state.hparams, "beta": jnp.float32(0.5)}),
                               tiny_train, jax.random.key(1))
    step_a = jax.tree.map(jnp.subtract, a.params, state.params)
    step_b = jax.tree.map(jnp.subtract, b.params, state.params)
    testing.assert_trees_close(jax.tree.map(lambda x: 0.5 * x, step_a), step_b, atol=1e-6)
    assert max(float(jnp.max(jnp.abs(x))) for x in jax.tree.leaves(step_a)) > 1e-4


COHORT = dict(KW, clients_per_round=5)
ROUND_KEY = jax.random.key(1)


def _round(train, **kwargs):
    algo = pfedme(MODEL, **{**COHORT, **kwargs})
    state = algo.init(jax.random.key(0), train)
    return state, jax.jit(algo.round)(state, train, ROUND_KEY)


def test_train_all_clients_keeps_the_global_model_and_refreshes_every_personal_model(
        tiny_train):
    """The released code's round: the cohort computes what it computes in the default
    round (same keys, same start), so the global model is the same; every other
    client with data also trains its personal model; the train loss covers all."""
    state, (default, m_default) = _round(tiny_train)
    _, (every, m_every) = _round(tiny_train, train_all_clients=True)
    testing.assert_trees_close(every.params, default.params, rtol=0, atol=0)
    ids = np.asarray(testing.common.cohort(tiny_train, ROUND_KEY, 5)[0])
    n = np.asarray(tiny_train.num_examples)
    others = np.setdiff1d(np.arange(tiny_train.num_clients), ids)
    for a, b, before in zip(*map(jax.tree.leaves, (every.client_params, default.client_params,
                                                   state.client_params))):
        a, b, before = map(np.asarray, (a, b, before))
        np.testing.assert_array_equal(a[ids], b[ids])
        np.testing.assert_array_equal(b[others], before[others])  # the paper's round
        moved = np.abs(a - before).reshape(len(a), -1).max(1) > 1e-6
        np.testing.assert_array_equal(moved[others], n[others] > 0)
    assert not np.isclose(float(m_every["train_loss"]), float(m_default["train_loss"]))


def test_train_all_clients_with_full_participation_is_the_default_round(tiny_train):
    a = _round(tiny_train, clients_per_round=None)[1]
    b = _round(tiny_train, clients_per_round=None, train_all_clients=True)[1]
    testing.assert_trees_close(a, b, rtol=0, atol=0)


def test_mu_is_weight_decay_on_the_personal_sub_problem(tiny_train):
    """One step (R = K = 1, lambda = 0): theta' = w - eta_p (grad f(w) + mu w), so mu
    moves theta by exactly -eta_p mu w against mu = 0; the local copy does not move."""
    kw = dict(lam=0.0, personal_lr=0.1, local_steps=1, inner_steps=1)
    state, (base, _) = _round(tiny_train, **kw)
    _, (decayed, _) = _round(tiny_train, mu=0.5, **kw)
    testing.assert_trees_close(decayed.params, base.params, rtol=0, atol=0)
    ids = np.asarray(testing.common.cohort(tiny_train, ROUND_KEY, 5)[0])
    has = ids[np.asarray(tiny_train.num_examples)[ids] > 0]
    for a, b, w in zip(*map(jax.tree.leaves, (decayed.client_params, base.client_params,
                                              state.params))):
        diff = np.asarray(a)[has] - np.asarray(b)[has]
        np.testing.assert_allclose(diff, np.broadcast_to(-0.1 * 0.5 * np.asarray(w), diff.shape),
                                   atol=1e-6)


def test_mu_is_traced(tiny_train):
    """mu lives in state.hparams: an algorithm built with mu = 0 run on a state whose
    mu is 0.3 is the algorithm built with mu = 0.3 (and differs from mu = 0)."""
    state, (zero, _) = _round(tiny_train)
    algo = pfedme(MODEL, **COHORT)
    swept = state.replace(hparams={**state.hparams, "mu": jnp.float32(0.3)})
    got, _ = jax.jit(algo.round)(swept, tiny_train, ROUND_KEY)
    _, (want, _) = _round(tiny_train, mu=0.3)
    testing.assert_trees_close(got, want, rtol=0, atol=0)
    assert not np.allclose(np.asarray(got.client_params["head"]["bias"]),
                           np.asarray(zero.client_params["head"]["bias"]))


@pytest.mark.parametrize("kwargs,match", [
    ({"mu": -0.1}, "mu"), ({"mu": "x"}, "mu"), ({"mu": float("nan")}, "mu"),
    ({"train_all_clients": 1}, "train_all_clients"),
    ({"train_all_clients": "yes"}, "train_all_clients"),
    ({"lam": -1.0}, "lam"), ({"inner_steps": 0}, "inner_steps"), ({"personal_lr": "x"},
                                                                   "personal_lr"),
    ({"beta": -0.5}, "beta"), ({"weighting": "median"}, "weighting"),
    ({"clients_per_round": 0}, "clients_per_round"), ({"batch_size": 0}, "batch_size")])
def test_bad_arguments_raise_at_construction(kwargs, match):
    with pytest.raises(ValueError, match=match):
        pfedme(MODEL, **kwargs)


def test_uniform_weighting_differs_from_sample_weighting(tiny_train):
    a, b = pfedme(MODEL, **KW), pfedme(MODEL, weighting="uniform", **KW)
    state = a.init(jax.random.key(0), tiny_train)
    pa = jax.jit(a.round)(state, tiny_train, jax.random.key(1))[0].params
    pb = jax.jit(b.round)(state, tiny_train, jax.random.key(1))[0].params
    assert not np.allclose(np.asarray(pa["head"]["bias"]), np.asarray(pb["head"]["bias"]))
