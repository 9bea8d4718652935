"""Execution strategies and cohort sampling."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedjax_pfl.core import reductions, sampling
from fedjax_pfl.core.execution import Execution, as_execution, map_clients, map_reduce


def fn(scale, x):
    y = scale * x["a"] ** 2
    return {"y": y}, {"sum_a": x["a"].sum(0), "count": jnp.ones(())}


@pytest.mark.parametrize("size", [1, 7, 16, 18])  # 18 on 4 devices: 2 padding rows
@pytest.mark.parametrize("execution", [
    Execution("vmap"), Execution("chunked", chunk_size=3), Execution("chunked", chunk_size=64),
    Execution("sharded"), Execution("sharded", chunk_size=2),
    Execution("sharded", chunk_size=3)], ids=str)  # 3 does not divide 4 or 5 rows per device
def test_map_reduce_strategies_agree(size, execution):
    xs = {"a": jnp.arange(size * 3, dtype=jnp.float32).reshape(size, 3)}
    ys, total = jax.jit(lambda s, x: map_reduce(fn, s, x, execution))(2.0, xs)
    np.testing.assert_allclose(ys["y"], 2.0 * np.asarray(xs["a"]) ** 2)
    np.testing.assert_allclose(total["sum_a"], np.asarray(xs["a"]).sum())
    assert float(total["count"]) == size  # padded rows are excluded from sums
    assert map_clients(lambda s, x: s * x["a"], 1.0, xs, execution).shape == (size, 3)


# Log-weights far below exp's range (a plain sum of e^a x is 0 / 0), 400 e-folds
# apart, and -inf (no weight): the softmax-weighted mean must still be exact.
LOG_W = np.array([-1e4, -1e4 - 2.0, -np.inf, -1e4 + 1.0, -1e4 - 400.0, -np.inf, -1e4 + 0.5])
GENERIC_LWS = reductions.Reduction(reductions.LOG_WEIGHTED_SUM.identity,
                                   reductions.LOG_WEIGHTED_SUM.combine)  # default fold/across


@pytest.mark.parametrize("reduction", [reductions.LOG_WEIGHTED_SUM, GENERIC_LWS],
                         ids=["lws", "lws-generic"])
@pytest.mark.parametrize("execution", [
    Execution("vmap"), Execution("chunked", chunk_size=3), Execution("sharded"),
    Execution("sharded", chunk_size=1)], ids=str)
def test_log_weighted_sum_is_a_stable_softmax_mean_under_every_strategy(execution, reduction):
    xs = {"a": jnp.arange(7 * 2, dtype=jnp.float32).reshape(7, 2) + 1.0,
          "log_w": jnp.asarray(LOG_W, jnp.float32)}
    term = lambda _, x: (x["a"][0], reductions.log_weighted_term(x["log_w"], x["a"]))
    ys, total = jax.jit(lambda x: map_reduce(term, (), x, execution, reduction))(xs)
    p = np.exp(LOG_W - LOG_W.max())
    want = (p / p.sum()) @ np.asarray(xs["a"], np.float64)
    np.testing.assert_allclose(reductions.log_weighted_mean(total), want, rtol=1e-6)
    np.testing.assert_allclose(ys, np.asarray(xs["a"])[:, 0])
    none = jax.jit(lambda x: map_reduce(term, (), x, execution, reduction))(
        {**xs, "log_w": jnp.full((7,), -jnp.inf)})[1]
    np.testing.assert_array_equal(reductions.log_weighted_mean(none), 0.0)  # no weight: zeros


def test_sharded_gradients_of_replicated_inputs_are_not_summed_across_devices():
    """The shard_map pitfall: grads w.r.t. a broadcast input must stay per-client."""
    xs = {"a": jnp.arange(8.0).reshape(8, 1)}
    grad_fn = lambda w, x: (jax.grad(lambda v: jnp.sum(v * x["a"]))(w), ())
    for execution in (Execution("vmap"), Execution("sharded")):
        grads, _ = map_reduce(grad_fn, jnp.ones(()), xs, execution)
        np.testing.assert_allclose(grads, np.arange(8.0))


@pytest.mark.parametrize("kwargs,match", [
    ({"strategy": "pmap"}, "strategy"), ({"strategy": "chunked"}, "chunk_size"),
    ({"strategy": "vmap", "chunk_size": 0}, "chunk_size")])
def test_execution_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Execution(**kwargs)
    assert as_execution("chunked").chunk_size == 64


def test_cohort_is_fixed_size_unique_and_compiles_once():
    traces = []

    @jax.jit
    def draw(key):
        traces.append(None)
        return sampling.sample_cohort(key, 100, 10)

    seen = set()
    for r in range(20):
        ids = np.asarray(draw(jax.random.key(r)))
        assert ids.shape == (10,) and len(set(ids)) == 10 and ids.min() >= 0 and ids.max() < 100
        seen.update(ids.tolist())
    assert len(traces) == 1 and len(seen) > 50
    np.testing.assert_array_equal(sampling.sample_cohort(jax.random.key(0), 5, None), np.arange(5))


def test_client_keys_depend_on_the_id_only():
    key = jax.random.key(3)
    a = sampling.client_keys(key, jnp.array([4, 9]))
    b = sampling.client_keys(key, jnp.array([1, 9, 7]))
    np.testing.assert_array_equal(jax.random.key_data(a[1]), jax.random.key_data(b[1]))


def test_put_writes_rows_and_leaves_the_rest_bit_identical():
    tree = {"p": jnp.arange(12.0).reshape(6, 2)}
    out = sampling.put(tree, jnp.array([1, 4]), {"p": -jnp.ones((2, 2))})
    rest = np.array([0, 2, 3, 5])
    np.testing.assert_array_equal(np.asarray(out["p"])[rest], np.asarray(tree["p"])[rest])
    np.testing.assert_array_equal(np.asarray(out["p"])[[1, 4]], -1)
    np.testing.assert_array_equal(sampling.take(out, jnp.array([4]))["p"], [[-1, -1]])
