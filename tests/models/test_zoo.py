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
