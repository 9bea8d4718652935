"""The model zoo and the Model triple."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedjax_pfl import models


@pytest.mark.parametrize("shape,flat", [((28, 28, 1), 1024), ((32, 32, 3), 1600)])
def test_fedavg_cnn_shapes(shape, flat):
    model = models.cnn(shape, 10)
    params = model.init(jax.random.key(0))
    assert params["hidden_0"]["kernel"].shape == (flat, 512)
    assert params["conv_0"]["kernel"].shape == (5, 5, shape[2], 32)
    logits = model.apply(params, {"x": jnp.zeros((3, *shape))}, None)
    assert logits.shape == (3, 10)


def test_mlp_logreg_and_loss():
    mlp = models.mlp((4, 4), 5, hidden=(7, 6), activation="elu")
    params = mlp.init(jax.random.key(0))
    assert [params[k]["kernel"].shape for k in ("hidden_0", "hidden_1", "head")] == [
        (16, 7), (7, 6), (6, 5)]
    logreg = models.logistic_regression((3,), 2)
    p = logreg.init(jax.random.key(0))
    assert set(p) == {"head"} and models.num_params(p) == 3 * 2 + 2
    batch = {"x": jnp.ones((2, 3)), "y": jnp.array([0, 1])}
    loss = models.per_example_loss(logreg, jax.tree.map(jnp.zeros_like, p), batch)
    np.testing.assert_allclose(loss, np.log(2.0), rtol=1e-6)


def test_vmapped_init_stacks_independent_models():
    model = models.mlp((3,), 2)
    stacked = jax.vmap(model.init)(jax.random.split(jax.random.key(0), 4))
    kernels = stacked["head"]["kernel"]
    assert kernels.shape == (4, 64, 2) and not np.allclose(kernels[0], kernels[1])


@pytest.mark.parametrize("call,match", [
    (lambda: models.mlp((3,), 1), "num_classes"),
    (lambda: models.mlp((3,), 2, hidden=(0,)), "hidden"),
    (lambda: models.mlp((3,), 2, activation="nope"), "activation"),
    (lambda: models.cnn((8, 8, 1), 10), "input_shape"),
])
def test_bad_arguments(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_batch_norm_models_train_with_batch_statistics_and_evaluate_with_running_ones():
    model = models.mlp_bn((5,), 3, hidden=(6, 4))
    params = model.init(jax.random.key(0))
    assert set(params) == {"params", "batch_stats"}
    assert set(params["batch_stats"]) == {"bn_0", "bn_1"}
    x = jax.random.normal(jax.random.key(1), (6, 5)) * 3.0 + 2.0
    batch = {"x": x, "y": jnp.zeros(6, jnp.int32)}
    assert not np.allclose(model.apply(params, batch, None),
                           model.apply(params, batch, jax.random.key(2)))
    # Training normalizes the marked rows with their own statistics: the other rows
    # (padding) change nothing on them.
    mask = jnp.array([True, True, True, True, False, False])
    masked = model.apply(params, {**batch, models.TRAIN_MASK: mask}, jax.random.key(2))
    alone = model.apply(params, {"x": x[:4]}, jax.random.key(2))
    np.testing.assert_allclose(masked[:4], alone, rtol=1e-5, atol=1e-6)
    # One running-average step (momentum 0.1, biased variance) from the weighted rows.
    new = model.update_stats(params, batch, jnp.where(mask, 0.25, 0.0))
    dense = params["params"]["hidden_0"]
    h = np.asarray(x[:4]) @ np.asarray(dense["kernel"]) + np.asarray(dense["bias"])
    np.testing.assert_allclose(new["batch_stats"]["bn_0"]["mean"], 0.1 * h.mean(0), atol=1e-5)
    np.testing.assert_allclose(new["batch_stats"]["bn_0"]["var"], 0.9 + 0.1 * h.var(0),
                               rtol=1e-5)
    assert new["params"] is params["params"]


def test_cnn_bn_and_models_without_batch_norm():
    model = models.cnn_bn((16, 16, 3), 4, channels=(8,), hidden=16)
    params = model.init(jax.random.key(0))
    assert params["batch_stats"]["bn_0"]["mean"].shape == (8,)
    assert params["params"]["hidden_0"]["kernel"].shape == (8 * 8 * 8, 16)
    x = {"x": jnp.ones((2, 16, 16, 3))}
    assert model.apply(params, x, jax.random.key(1)).shape == (2, 4)
    assert model.update_stats(params, x, jnp.ones(2))["batch_stats"]["bn_0"]["var"].shape == (8,)
    assert models.mlp((3,), 2).update_stats is None
    assert {"mlp_bn", "cnn_bn"} <= set(models.MODELS)
