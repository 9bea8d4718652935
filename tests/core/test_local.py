"""Local training of one client: batching plans, masking, and an SGD golden."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fedjax_pfl.core import local
from fedjax_pfl.data.client_data import ClientData
from fedjax_pfl.models.model import Model


def row(x, t, pad_to=None):
    """One client's row with float targets `t` (a squared-loss toy problem)."""
    n = len(x)
    pad = (pad_to or n) - n
    x = np.pad(np.asarray(x, np.float32), (0, pad))
    t = np.pad(np.asarray(t, np.float32), (0, pad))
    return ClientData({"x": jnp.asarray(x), "t": jnp.asarray(t)}, jnp.asarray(n, jnp.int32))


SCALAR = Model(init=lambda key: {"w": jnp.zeros(())},
               apply=lambda p, b, key: p["w"] * b["x"],
               loss=lambda out, b: (out - b["t"]) ** 2)
LOSS = local.model_loss_fn(SCALAR)


@pytest.mark.parametrize("n,N,B", [(7, 7, 3), (5, 12, 4), (1, 9, 4), (8, 8, 8), (3, 10, 20)])
def test_epoch_plan_visits_every_valid_row_once_per_epoch(n, N, B):
    idx, w = local.batch_plan(jax.random.key(n), n, N, batch_size=B, local_epochs=3)
    idx, w = np.asarray(idx), np.asarray(w)
    per_epoch = -(-N // B)
    assert idx.shape == (3 * per_epoch, B)
    for e in range(3):
        rows = idx[e * per_epoch:(e + 1) * per_epoch]
        weights = w[e * per_epoch:(e + 1) * per_epoch]
        assert sorted(rows[weights > 0].tolist()) == list(range(n))
        active = (weights > 0).any(axis=1)
        assert active.sum() == -(-n // B)  # steps past ceil(n/B) are masked
        assert active[: -(-n // B)].all()
        np.testing.assert_allclose(weights[active].sum(axis=1), 1.0, rtol=1e-6)
        last = weights[-(-n // B) - 1]
        assert np.count_nonzero(last) == (n % B or B)  # partial last batch: mean of valid rows


def test_epoch_order_is_a_fresh_permutation_each_epoch():
    idx, w = local.batch_plan(jax.random.key(0), 40, 40, batch_size=40, local_epochs=2)
    assert not np.array_equal(idx[0], idx[1])


def test_step_plan_draws_within_valid_rows():
    idx, w = local.batch_plan(jax.random.key(1), 6, 50, batch_size=32, local_steps=20)
    assert idx.shape == (20, 32) and 0 <= idx.min() and idx.max() < 6
    np.testing.assert_allclose(np.asarray(w).sum(axis=1), 1.0, rtol=1e-6)
    _, w0 = local.batch_plan(jax.random.key(1), 0, 50, batch_size=32, local_steps=20)
    assert not np.asarray(w0).any()


def test_full_batch_sgd_golden():
    """Two full-batch SGD steps on f(w) = mean((w x - t)^2), computed by hand."""
    data = row([1.0, 2.0], [2.0, 4.0], pad_to=5)
    result = local.local_train({"w": jnp.zeros(())}, data, jax.random.key(0), loss_fn=LOSS,
                               optimizer=optax.sgd(0.1), batch_size=2, local_epochs=2)
    # grad = 2 mean(x (w x - t)) = 2 mean([w - 2, 4w - 8]) = 5w - 10.
    w1 = 0.0 - 0.1 * (5 * 0.0 - 10)   # 1.0
    w2 = w1 - 0.1 * (5 * w1 - 10)     # 1.5
    np.testing.assert_allclose(result.params["w"], w2, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(result.losses)[[0, 3]], [10.0, 2.5], rtol=1e-6)
    np.testing.assert_array_equal(result.counts, [2, 0, 0, 2, 0, 0])
    np.testing.assert_allclose(result.mean_loss(), 6.25, rtol=1e-6)
    np.testing.assert_allclose(result.mean_loss(last_steps=3), 2.5, rtol=1e-6)


def test_penalty_is_added_to_the_objective_not_the_loss():
    data = row([1.0], [3.0])
    result = local.local_train({"w": jnp.zeros(())}, data, jax.random.key(0), loss_fn=LOSS,
                               optimizer=optax.sgd(0.1), batch_size=1, local_steps=1,
                               penalty=lambda p: 10.0 * (p["w"] - 1.0) ** 2)
    # grad = 2 (w - 3) + 20 (w - 1) at w=0 -> -6 - 20 = -26.
    np.testing.assert_allclose(result.params["w"], 2.6, rtol=1e-6)
    np.testing.assert_allclose(result.losses[0], 9.0, rtol=1e-6)


def test_empty_client_and_masked_steps_leave_stateful_optimizers_untouched():
    adam = optax.adam(0.1)
    empty = local.local_train({"w": jnp.ones(())}, row([], [], pad_to=4), jax.random.key(0),
                              loss_fn=LOSS, optimizer=adam, batch_size=2, local_epochs=3)
    assert float(empty.params["w"]) == 1.0 and not np.asarray(empty.counts).any()
    # One valid row padded to 8 rows: 4 batches per epoch, 1 active. The result
    # must equal the unpadded run, i.e. masked steps do not advance Adam.
    a = local.local_train({"w": jnp.ones(())}, row([1.0], [3.0], pad_to=8), jax.random.key(0),
                          loss_fn=LOSS, optimizer=adam, batch_size=2, local_epochs=3)
    b = local.local_train({"w": jnp.ones(())}, row([1.0], [3.0]), jax.random.key(0),
                          loss_fn=LOSS, optimizer=adam, batch_size=2, local_epochs=3)
    np.testing.assert_allclose(a.params["w"], b.params["w"], rtol=1e-6)


def test_custom_step_runs_the_same_masked_loop():
    """`step_fn` = the default step reproduces `local_train`; masked steps leave any carry."""
    adam, start = optax.adam(0.1), {"w": jnp.ones(())}
    data, key = row([1.0, 2.0, 0.5], [3.0, 1.0, 2.0], pad_to=8), jax.random.key(1)
    kw = {"batch_size": 2, "local_epochs": 2}
    want = local.local_train(start, data, key, loss_fn=LOSS, optimizer=adam, **kw)
    got = local.local_train((start, adam.init(start)), data, key, **kw,
                            step_fn=local.optimizer_step(adam, local.loss_grad(LOSS)))
    np.testing.assert_array_equal(got.params[0]["w"], want.params["w"])
    np.testing.assert_array_equal(got.losses, want.losses)
    count = local.local_train(jnp.zeros(()), data, key, step_fn=lambda c, b, w, k: (c + 1, 0.0),
                              **kw)
    assert int(count.params) == int(np.sum(np.asarray(count.counts) > 0)) == 4


@pytest.mark.parametrize("kwargs,match", [
    ({"batch_size": 0}, "batch_size"),
    ({"local_steps": 2, "local_epochs": 1}, "local_steps / local_epochs"),
    ({"local_steps": -1}, "local_steps"),
    ({"local_steps": 0}, "local_steps: expected an int >= 1, got 0"),
    ({"local_epochs": 0}, "local_epochs: expected an int >= 1, got 0"),
    ({"local_steps": True}, "local_steps"),
    ({"local_epochs": 1.5}, "local_epochs"),
    ({"optimizer": "not_an_optimizer"}, "optimizer"),
    ({"optimizer": 3}, "optimizer"),
])
def test_schedule_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        local.LocalSchedule(**kwargs)


def test_schedule_defaults_to_one_epoch_and_accepts_optimizer_forms():
    assert local.LocalSchedule(batch_size=4).num_steps(10) == 3
    assert local.LocalSchedule(batch_size=4, local_steps=7).num_steps(10) == 7
    for spec in ("adam", lambda lr: optax.sgd(lr, momentum=0.9), optax.sgd(0.3)):
        assert isinstance(local.make_optimizer(spec, 0.1), optax.GradientTransformation)
