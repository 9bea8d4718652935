"""nu-step meta-FL and Per-FedAvg: reductions, gradient checks, naive loop, compile once,
the evaluation's step size `eval_lr` (its naive reference runs in test_common.py).

The gradient checks run in float64 (`jax.enable_x64` inside the test) on a
small MLP: the exact meta-gradient against central finite differences of
F(w) = f(w^(nu)(w)); against an explicit backward recursion of Hessian-vector
products; first-order against the gradient at w^(nu); HF against exact as
delta shrinks.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

from fedjax_pfl import models, testing
from fedjax_pfl.algorithms import fedavg, meta_fl, per_fedavg
from fedjax_pfl.algorithms.meta_fl import meta_gradient

MODEL = models.mlp((6,), 3, hidden=(8,))
KW = dict(batch_size=4, local_steps=3, client_lr=0.1, inner_lr=0.05, clients_per_round=5)


def _flat(tree):
    return np.concatenate([np.ravel(np.asarray(a, np.float64)) for a in jax.tree.leaves(tree)])


def _problem(seed=0, nu=3, tanh=True):
    """A small MLP (4 -> 5 -> 3), float64 params, and batches: inner [nu, 6],
    outer [6], Hessian [nu, 6]."""
    model = models.mlp((4,), 3, hidden=(5,), activation="tanh" if tanh else "elu")
    params = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64) * 2.0,
                          model.init(jax.random.key(seed)))
    rng = np.random.default_rng(seed)
    make = lambda *shape: {"x": jnp.asarray(rng.normal(size=shape + (4,))),
                           "y": jnp.asarray(rng.integers(0, 3, size=shape), jnp.int32)}
    loss = lambda p, b: jnp.mean(model.loss(model.apply(p, b, None), b))
    return loss, params, make(nu, 6), make(6), make(nu, 6)


def _unrolled(loss, alpha, inner, outer, nu):
    def meta_loss(w):
        for j in range(nu):
            b = jax.tree.map(lambda a, j=j: a[j], inner)
            w = jax.tree.map(lambda p, g: p - alpha * g, w, jax.grad(loss)(w, b))
        return loss(w, outer)
    return meta_loss


def _hvp_recursion(loss, params, inner, outer, hessian, alpha, nu):
    """(I - a H_0) ... (I - a H_{nu-1}) grad f(w_nu): jvp-of-grad HVPs, a Python loop."""
    iterates = [params]
    for j in range(nu):
        b = jax.tree.map(lambda a, j=j: a[j], inner)
        g = jax.grad(loss)(iterates[-1], b)
        iterates.append(jax.tree.map(lambda p, q: p - alpha * q, iterates[-1], g))
    v = jax.grad(loss)(iterates[-1], outer)
    for j in reversed(range(nu)):
        bh = jax.tree.map(lambda a, j=j: a[j], hessian)
        hv = jax.jvp(lambda u, bh=bh: jax.grad(loss)(u, bh), (iterates[j],), (v,))[1]
        v = jax.tree.map(lambda a, b: a - alpha * b, v, hv)
    return v, iterates[-1]


@pytest.mark.parametrize("nu", [1, 2, 3])
def test_exact_meta_gradient_matches_finite_differences(nu):
    with jax.enable_x64(True):
        loss, params, inner, outer, _ = _problem(nu=nu)
        alpha = 0.3
        inner = jax.tree.map(lambda a: a[:nu], inner)
        value, grad = jax.jit(lambda p: meta_gradient(loss, p, inner, outer, alpha=alpha))(params)
        f = jax.jit(_unrolled(loss, alpha, inner, outer, nu))
        flat, unravel = ravel_pytree(params)
        eps = 1e-6
        fd = np.array([(f(unravel(flat + eps * e)) - f(unravel(flat - eps * e))) / (2 * eps)
                       for e in np.eye(flat.size)])
        got = _flat(grad)
        err = np.max(np.abs(got - fd)) / np.max(np.abs(fd))
        print(f"nu={nu}: max |exact - central FD| / max |FD| = {err:.2e}")
        assert err < 1e-7
        np.testing.assert_allclose(value, f(params), rtol=1e-12)


@pytest.mark.parametrize("shared", [False, True], ids=["independent", "shared"])
@pytest.mark.parametrize("remat", [False, True], ids=["plain", "remat"])
def test_exact_equals_explicit_hvp_recursion(shared, remat):
    nu, alpha = 3, 0.3
    with jax.enable_x64(True):
        loss, params, inner, outer, hessian = _problem(seed=1, nu=nu)
        hessian = inner if shared else hessian
        _, got = meta_gradient(loss, params, inner, outer, None if shared else hessian,
                               alpha=alpha, remat=remat)
        want, _ = _hvp_recursion(loss, params, inner, outer, hessian, alpha, nu)
        np.testing.assert_allclose(_flat(got), _flat(want), rtol=1e-10, atol=1e-12)
        # and the independent D'' batches really change the result
        if not shared:
            other, _ = _hvp_recursion(loss, params, inner, outer, inner, alpha, nu)
            assert np.max(np.abs(_flat(other) - _flat(want))) > 1e-4


def test_first_order_is_the_gradient_at_the_adapted_point():
    nu, alpha = 3, 0.3
    with jax.enable_x64(True):
        loss, params, inner, outer, hessian = _problem(seed=2, nu=nu)
        value, got = meta_gradient(loss, params, inner, outer, hessian, alpha=alpha, mode="fo")
        _, adapted = _hvp_recursion(loss, params, inner, outer, hessian, alpha, nu)
        want = jax.grad(loss)(adapted, outer)
        np.testing.assert_allclose(_flat(got), _flat(want), rtol=1e-12, atol=1e-14)
        np.testing.assert_allclose(value, loss(adapted, outer), rtol=1e-12)
        exact = meta_gradient(loss, params, inner, outer, hessian, alpha=alpha)[1]
        assert np.max(np.abs(_flat(exact) - _flat(got))) > 1e-3  # the dropped factors matter


def test_hessian_free_converges_to_exact_as_delta_shrinks():
    nu, alpha = 3, 0.3
    with jax.enable_x64(True):
        loss, params, inner, outer, hessian = _problem(seed=3, nu=nu)
        exact = _flat(meta_gradient(loss, params, inner, outer, hessian, alpha=alpha)[1])
        errors = []
        for delta in (1e-1, 1e-2, 1e-3, 1e-4):
            hf = meta_gradient(loss, params, inner, outer, hessian, alpha=alpha, mode="hf",
                               delta=delta)[1]
            errors.append(np.max(np.abs(_flat(hf) - exact)) / np.max(np.abs(exact)))
        print("hf relative errors for delta 1e-1..1e-4:", [f"{e:.1e}" for e in errors])
        assert all(b < a / 50 for a, b in zip(errors, errors[1:]))  # O(delta^2)
        assert errors[-1] < 1e-8


@pytest.mark.parametrize("schedule,aggregation,weighting", [
    ({"local_steps": 3}, "weighted", "num_examples"),
    pytest.param({"local_steps": None, "local_epochs": 2}, "mean", "uniform",
                 marks=pytest.mark.slow)], ids=["steps", "epochs"])
def test_nu_zero_is_fedavg(tiny_train, tiny_test, schedule, aggregation, weighting):
    config = {**KW, **schedule}
    meta = meta_fl(MODEL, nu=0, aggregation=aggregation, **config)
    base = fedavg(MODEL, weighting=weighting, **{k: v for k, v in config.items()
                                                 if k != "inner_lr"})
    a, b = meta.init(jax.random.key(0), tiny_train), base.init(jax.random.key(0), tiny_train)
    a, ma = jax.jit(meta.round)(a, tiny_train, jax.random.key(1))
    b, mb = jax.jit(base.round)(b, tiny_train, jax.random.key(1))
    testing.assert_trees_close(a.params, b.params, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(ma["train_loss"], mb["train_loss"], rtol=1e-6)
    # with nu' = 0 the evaluation is FedAvg's
    got = meta_fl(MODEL, nu=0, **config).evaluate(a, tiny_train, tiny_test)
    want = fedavg(MODEL).evaluate(b, tiny_train, tiny_test)
    for k in ("num_examples", "num_correct", "loss_sum"):
        np.testing.assert_allclose(got[k], want[k], rtol=1e-5, atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("config", [
    {"nu": 3, "mode": "fo", "local_steps": 2},
    {"nu": 2, "mode": "hf", "hessian_batches": "shared", "local_steps": 2},
    {"nu": 1, "mode": "exact", "remat": True, "aggregation": "weighted", "inner_batch_size": 3,
     "hessian_batch_size": 5}], ids=["fo3", "hf2-shared", "exact1-remat"])
def test_other_modes_equal_naive_loop(tiny_train, config):
    config = {**KW, **config}
    algo = meta_fl(MODEL, **config)
    state = algo.init(jax.random.key(0), tiny_train)
    key = jax.random.key(5)
    want, want_m = testing.naive_round("meta_fl", MODEL, state, tiny_train, key, **config)
    got, got_m = jax.jit(algo.round)(state, tiny_train, key)
    testing.assert_trees_close(got, want, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got_m["train_loss"], want_m["train_loss"], rtol=1e-5)
    assert not np.allclose(_flat(got.params), _flat(state.params))


def test_per_fedavg_is_meta_fl_with_one_step(tiny_train):
    a, b = per_fedavg(MODEL, mode="fo", **KW), meta_fl(MODEL, nu=1, mode="fo", **KW)
    state = a.init(jax.random.key(0), tiny_train)
    testing.assert_trees_close(jax.jit(a.round)(state, tiny_train, jax.random.key(1)),
                               jax.jit(b.round)(state, tiny_train, jax.random.key(1)),
                               rtol=0, atol=0)


@pytest.mark.parametrize("nu", [2])
def test_compiles_once_per_nu_and_hparams_are_traced(tiny_train, tiny_test, nu):
    algo = meta_fl(MODEL, nu=nu, mode="exact", **KW)
    traces = []

    def traced(state, train, key):
        traces.append(None)
        return algo.round(state, train, key)

    round_fn = jax.jit(traced)
    state = algo.init(jax.random.key(0), tiny_train)
    for r in range(3):
        hp = {**state.hparams, "inner_lr": jnp.float32(0.01 * (r + 1))}
        state, _ = round_fn(state.replace(hparams=hp), tiny_train, jax.random.key(r))
    assert len(traces) == 1
    out = jax.jit(algo.evaluate)(state, tiny_train, tiny_test)
    assert out["curve_num_correct"].shape == (tiny_train.num_clients, 6)
    np.testing.assert_array_equal(out["num_correct"], out["curve_num_correct"][:, nu])


def _trained(tiny_train, factory=meta_fl, **kwargs):
    """(algorithm, the state after one round) of `factory(MODEL, **KW, **kwargs)`."""
    algo = factory(MODEL, **{**KW, **kwargs})
    state = algo.init(jax.random.key(0), tiny_train)
    return algo, jax.jit(algo.round)(state, tiny_train, jax.random.key(1))[0]


@pytest.mark.slow
@pytest.mark.parametrize("factory", [meta_fl, per_fedavg], ids=["meta_fl", "per_fedavg"])
def test_eval_lr_defaults_to_alpha(tiny_train, tiny_test, factory):
    """eval_lr = None fine-tunes with alpha, bit for bit, and follows a swept alpha."""
    algo, state = _trained(tiny_train, factory)
    default = jax.jit(algo.evaluate)(state, tiny_train, tiny_test)
    explicit_algo, explicit_state = _trained(tiny_train, factory, eval_lr=KW["inner_lr"])
    testing.assert_trees_close(explicit_state.params, state.params, rtol=0, atol=0)
    explicit = jax.jit(explicit_algo.evaluate)(explicit_state, tiny_train, tiny_test)
    testing.assert_trees_close(explicit, default, rtol=0, atol=0)
    # alpha changed in the state (a sweep) is also the evaluation's step
    swept = state.replace(hparams={**state.hparams, "inner_lr": jnp.float32(0.4)})
    other = factory(MODEL, **{**KW, "eval_lr": 0.4})
    with_eval_lr = state.replace(hparams={**state.hparams, "eval_lr": jnp.float32(0.4)})
    testing.assert_trees_close(jax.jit(algo.evaluate)(swept, tiny_train, tiny_test),
                               jax.jit(other.evaluate)(with_eval_lr, tiny_train, tiny_test),
                               rtol=0, atol=0)


@pytest.mark.slow  # ~15 s (compiles three evaluations)
def test_eval_lr_changes_only_the_evaluation(tiny_train, tiny_test):
    algo, state = _trained(tiny_train)
    other_algo, other_state = _trained(tiny_train, eval_lr=0.5)
    testing.assert_trees_close(other_state.params, state.params, rtol=0, atol=0)
    a = jax.jit(algo.evaluate)(state, tiny_train, tiny_test)
    b = jax.jit(other_algo.evaluate)(other_state, tiny_train, tiny_test)
    # nu' = 0 tests the global model; every later point of the curve fine-tunes with eval_lr
    np.testing.assert_array_equal(a["curve_loss_sum"][:, 0], b["curve_loss_sum"][:, 0])
    with_data = (np.asarray(tiny_train.num_examples) > 0) & (np.asarray(tiny_test.num_examples)
                                                              > 0)
    assert np.all(np.abs(np.asarray(a["curve_loss_sum"] - b["curve_loss_sum"])[with_data, 1:])
                  > 1e-6)


@pytest.mark.slow
def test_eval_lr_is_traced(tiny_train, tiny_test):
    algo, state = _trained(tiny_train, eval_lr=0.1)
    evaluate = jax.jit(algo.evaluate)
    out = [evaluate(state.replace(hparams={**state.hparams, "eval_lr": jnp.float32(lr)}),
                    tiny_train, tiny_test) for lr in (0.1, 0.3)]
    assert evaluate._cache_size() == 1
    built, built_state = _trained(tiny_train, eval_lr=0.3)
    want = jax.jit(built.evaluate)(built_state, tiny_train, tiny_test)
    testing.assert_trees_close(out[1], want, rtol=0, atol=0)
    assert not np.allclose(out[0]["curve_loss_sum"], out[1]["curve_loss_sum"])


@pytest.mark.parametrize("factory", [meta_fl, per_fedavg], ids=["meta_fl", "per_fedavg"])
@pytest.mark.parametrize("eval_lr", [-0.1, "x", float("inf"), True])
def test_bad_eval_lr_is_rejected(factory, eval_lr):
    with pytest.raises(ValueError, match="eval_lr"):
        factory(MODEL, eval_lr=eval_lr)


@pytest.mark.parametrize("kwargs,match", [
    ({"nu": -1}, "nu"), ({"nu": 1.5}, "nu"), ({"mode": "second"}, "mode"),
    ({"hessian_batches": "same"}, "hessian_batches"), ({"aggregation": "sum"}, "aggregation"),
    ({"delta": 0.0}, "delta"), ({"inner_lr": -0.1}, "inner_lr"), ({"outer_lr": -1.0}, "outer_lr"),
    ({"inner_batch_size": 0}, "inner_batch_size"), ({"hessian_batch_size": 2.0},
                                                    "hessian_batch_size"),
    ({"eval_steps": 7, "eval_max_steps": 5}, "eval_steps"), ({"eval_max_steps": -1},
                                                              "eval_max_steps"),
    ({"batch_size": 0}, "batch_size"), ({"clients_per_round": 0}, "clients_per_round")])
def test_bad_arguments_raise_at_construction(kwargs, match):
    with pytest.raises(ValueError, match=match):
        meta_fl(MODEL, **kwargs)


def test_per_fedavg_rejects_nu():
    with pytest.raises(ValueError, match="nu"):
        per_fedavg(MODEL, nu=2)
