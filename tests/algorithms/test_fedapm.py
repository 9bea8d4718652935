"""FedAPM: dual and server formulas, stale rows, reduction to FedAlt, memory, flags."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fedjax_pfl import models, testing
from fedjax_pfl.algorithms import fedalt, fedapm
from fedjax_pfl.core import local, partial, sampling
from fedjax_pfl.core import params as params_lib
from fedjax_pfl.core.admm import shared_penalty

MODEL = models.mlp((6,), 3, hidden=(8,))
BASE = {"batch_size": 4, "local_steps": None, "local_epochs": 1, "client_lr": 0.3}
COHORT = 4
KEY = jax.random.key(3)


@functools.cache
def _build(factory, items):
    algo = factory(MODEL, **dict(items))
    return algo, jax.jit(algo.round), jax.jit(algo.evaluate)


def build(factory=fedapm, **overrides):
    config = {**BASE, "clients_per_round": COHORT, **overrides}
    return (*_build(factory, tuple(sorted(config.items()))), config)


def f64(tree):
    return jax.tree.map(lambda a: np.asarray(a, np.float64), tree)


def with_random_duals(state, scale=0.05):
    """A state whose duals are non-zero, so the formulas below are really exercised."""
    leaves, treedef = jax.tree.flatten(state.client_dual)
    keys = jax.random.split(jax.random.key(9), len(leaves))
    dual = [scale * jax.random.normal(k, a.shape) for k, a in zip(keys, leaves)]
    return state.replace(client_dual=jax.tree.unflatten(treedef, dual))


@pytest.mark.parametrize("server_average", ["all", "cohort"])
def test_dual_and_server_update_match_numpy(tiny_train, server_average):
    algo, round_fn, _, _ = build(server_average=server_average, rho=0.5)
    state = with_random_duals(algo.init(jax.random.key(0), tiny_train))
    new, _ = round_fn(state, tiny_train, KEY)
    ids = np.asarray(sampling.sample_cohort(sampling.round_keys(KEY)[0], 11, COHORT))
    rho, u_old = 0.5, f64(state.shared)
    u_i, dual_old, dual_new = f64(new.client_shared), f64(state.client_dual), f64(new.client_dual)
    has = np.asarray(tiny_train.num_examples) > 0
    members = np.flatnonzero(has) if server_average == "all" else [i for i in ids if has[i]]
    for path in u_old:
        want_dual = dual_old[path].copy()
        for i in ids:  # π_i ← π_i + ρ (u_i − u)
            want_dual[i] = dual_old[path][i] + rho * (u_i[path][i] - u_old[path])
        np.testing.assert_allclose(dual_new[path], want_dual, rtol=1e-5, atol=1e-6)
        # u = mean over the members of (u_i + π_i / ρ), stale rows included for "all".
        want_u = np.mean([u_i[path][i] + dual_new[path][i] / rho for i in members], axis=0)
        np.testing.assert_allclose(np.asarray(new.shared[path]), want_u, rtol=1e-5, atol=1e-6)
    assert len(members) == (9 if server_average == "all" else sum(has[ids]))


def test_clients_outside_cohort_keep_bit_identical_rows(tiny_train):
    algo, round_fn, _, _ = build()
    state = with_random_duals(algo.init(jax.random.key(0), tiny_train))
    new, _ = round_fn(state, tiny_train, KEY)
    ids = np.asarray(sampling.sample_cohort(sampling.round_keys(KEY)[0], 11, COHORT))
    outside = np.setdiff1d(np.arange(11), ids)
    for field in ("client_personal", "client_shared", "client_dual"):
        before, after = getattr(state, field), getattr(new, field)
        for path in before:
            np.testing.assert_array_equal(np.asarray(before[path])[outside],
                                          np.asarray(after[path])[outside])
            inside = [i for i in ids if tiny_train.num_examples[i] > 0]
            assert not np.array_equal(np.asarray(before[path])[inside],
                                      np.asarray(after[path])[inside]), (field, path)


@pytest.mark.parametrize("cohort", [COHORT, None])
def test_reduces_to_fedalt_without_admm_terms(tiny_train, cohort):
    """ρ = σ = weight_decay = 0, α_i = 1, π = 0, cohort average: FedAlt's client phases."""
    apm, apm_round, _, _ = build(rho=0.0, sigma=0.0, weight_decay=0.0, client_weight="unit",
                                 server_average="cohort", clients_per_round=cohort)
    alt, alt_round, _, _ = build(fedalt, weighting="uniform", clients_per_round=cohort)
    a = apm.init(jax.random.key(0), tiny_train)
    b = alt.init(jax.random.key(0), tiny_train)
    for r in range(2):
        key = jax.random.fold_in(KEY, r)
        a, ma = apm_round(a, tiny_train, key)
        b, mb = alt_round(b, tiny_train, key)
        testing.assert_trees_close(a.client_personal, b.client_personal, rtol=1e-6, atol=1e-6)
        testing.assert_trees_close(a.shared, b.shared, rtol=1e-6, atol=1e-6)
        testing.assert_trees_close(ma, mb, rtol=1e-5, atol=1e-6)
        for leaf in jax.tree.leaves(a.client_dual):
            assert not np.any(np.asarray(leaf))  # π stays at 0 when ρ = 0


def test_shared_penalty_has_the_textbook_gradient():
    """The penalty is written as (alpha wd + rho)/2 |u_i|^2 + <pi - rho u, u_i>; its gradient
    must be that of alpha wd/2 |u_i|^2 + <pi, u_i - u> + rho/2 |u_i - u|^2."""
    keys = jax.random.split(jax.random.key(5), 3)
    u_i, u, dual = ({"a": jax.random.normal(k, (4, 3)), "b": jax.random.normal(k, (3,))}
                    for k in keys)
    alpha, wd, rho = 0.05, 0.01, 0.3
    gap = lambda x: jax.tree.map(jnp.subtract, x, u)
    textbook = lambda x: (alpha * wd / 2 * partial.sq_norm(x) + optax.tree.vdot(dual, gap(x))
                          + rho / 2 * partial.sq_norm(gap(x)))
    got = jax.grad(shared_penalty(dual, u, alpha, wd, rho))(u_i)
    testing.assert_trees_close(got, jax.grad(textbook)(u_i), rtol=1e-6, atol=1e-6)


def test_state_memory_is_v_plus_two_u_per_client(tiny_train):
    algo = build()[0]
    state = algo.init(jax.random.key(0), tiny_train)
    m = tiny_train.num_clients
    want = {"head/bias": (3,), "head/kernel": (8, 3)}
    shared = {"hidden_0/bias": (8,), "hidden_0/kernel": (6, 8)}
    assert {k: v.shape for k, v in state.client_personal.items()} == {
        k: (m, *s) for k, s in want.items()}
    for field in ("client_shared", "client_dual"):
        assert {k: v.shape for k, v in getattr(state, field).items()} == {
            k: (m, *s) for k, s in shared.items()}
    assert {k: v.shape for k, v in state.shared.items()} == shared
    size_v, size_u = 8 * 3 + 3, 6 * 8 + 8
    per_client = sum(a.nbytes for f in ("client_personal", "client_shared", "client_dual")
                     for a in jax.tree.leaves(getattr(state, f)))
    assert per_client == (size_v + 2 * size_u) * m * 4
    scalars = state.round.nbytes + sum(a.nbytes for a in jax.tree.leaves(state.hparams))
    total = sum(a.nbytes for a in jax.tree.leaves(state))
    assert total == per_client + size_u * 4 + scalars
    assert all(a.dtype == jnp.float32 for a in jax.tree.leaves(state.client_dual))


def test_local_and_global_evaluation_protocols(tiny_train, tiny_test):
    algo, round_fn, eval_local, _ = build()
    _, _, eval_global, _ = build(evaluation="global")
    state, _ = round_fn(algo.init(jax.random.key(0), tiny_train), tiny_train, KEY)
    part = params_lib.partition(jax.eval_shape(MODEL.init, KEY), ("head",))
    got_local, got_global = eval_local(state, tiny_train, tiny_test), eval_global(
        state, tiny_train, tiny_test)
    for i in range(11):
        v = {k: a[i] for k, a in state.client_personal.items()}
        u_i = {k: a[i] for k, a in state.client_shared.items()}
        row = testing.client_row(tiny_test, i)
        for got, shared in ((got_local, u_i), (got_global, state.shared)):
            want = local.evaluate_client(MODEL, part.merge(v, shared), row)
            for k in ("num_correct", "loss_sum", "class_auc"):
                np.testing.assert_allclose(got[k][i], want[k], rtol=1e-5, atol=1e-6)
    assert not np.allclose(got_local["loss_sum"], got_global["loss_sum"])


@pytest.mark.slow
@pytest.mark.parametrize("flags", [
    {"server_average": "cohort", "client_weight": "unit"},
    {"local_steps": 3, "local_epochs": None, "rho": 0.2, "sigma": 0.3}])
def test_flags_equal_naive_loop(tiny_train, flags):
    algo, round_fn, _, config = build(**flags)
    state = with_random_duals(algo.init(jax.random.key(0), tiny_train))
    for r in range(2):
        key = jax.random.fold_in(KEY, r)
        want, want_metrics = testing.naive_round("fedapm", MODEL, state, tiny_train, key, **config)
        state, metrics = round_fn(state, tiny_train, key)
        testing.assert_trees_close(state, want, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(metrics["drift"], want_metrics["drift"], rtol=1e-5)
        np.testing.assert_allclose(metrics["train_loss"], want_metrics["train_loss"], rtol=1e-5)


@pytest.mark.parametrize("kwargs, name", [
    ({"rho": -1.0}, "rho"), ({"sigma": "x"}, "sigma"), ({"weight_decay": -0.1}, "weight_decay"),
    ({"client_weight": "n_i"}, "client_weight"), ({"server_average": "some"}, "server_average"),
    ({"evaluation": "best"}, "evaluation"), ({"personal": ("nothing",)}, "personal"),
    ({"personal": ("head", "hidden_0")}, "personal"), ({"batch_size": 0}, "batch_size")])
def test_bad_arguments_raise_before_compile(kwargs, name):
    with pytest.raises(ValueError, match=name):
        fedapm(MODEL, **kwargs)
