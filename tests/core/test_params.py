"""Labelling params as personal / shared; split and merge on the zoo models."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedjax_pfl import models
from fedjax_pfl.core import params as params_lib

KEY = jax.random.key(0)


def _shapes(model):
    return jax.eval_shape(model.init, KEY)


@pytest.mark.parametrize("label", [("head",), r"^head/", lambda path: path.startswith("head")])
def test_label_forms_agree_on_mlp(label):
    params = models.mlp((6,), 3, hidden=(8, 5)).init(KEY)
    part = params_lib.partition(params, label)
    assert part.personal_paths == ("head/bias", "head/kernel")
    assert part.shared_paths == ("hidden_0/bias", "hidden_0/kernel", "hidden_1/bias",
                                 "hidden_1/kernel")
    v, u = part.split(params)
    assert set(v) == set(part.personal_paths) and set(u) == set(part.shared_paths)
    np.testing.assert_array_equal(v["head/kernel"], params["head"]["kernel"])
    merged = part.merge(v, u)
    assert jax.tree.structure(merged) == jax.tree.structure(params)
    for a, b in zip(jax.tree.leaves(merged), jax.tree.leaves(params)):
        assert a is b
    labels = part.labels()
    assert labels["head"]["kernel"] is True and labels["hidden_0"]["kernel"] is False


def test_cnn_and_logreg_split_counts():
    cnn = _shapes(models.cnn((28, 28, 1), 10))
    part = params_lib.partition(cnn, ("conv_0", "conv_1"))
    v, u = part.split(cnn)
    assert params_lib.num_elements(v) == (5 * 5 * 1 * 32 + 32) + (5 * 5 * 32 * 64 + 64)
    assert params_lib.num_elements(u) == (1024 * 512 + 512) + (512 * 10 + 10)
    assert params_lib.num_elements(v) + params_lib.num_elements(u) == params_lib.num_elements(cnn)
    # Regex on the leaf name: every kernel personal, every bias shared.
    kernels = params_lib.partition(cnn, "kernel$")
    assert all(p.endswith("kernel") for p in kernels.personal_paths)
    assert len(kernels.shared_paths) == 4
    # Logistic regression has only a head: it can be all-personal but not split.
    logreg = _shapes(models.logistic_regression((6,), 3))
    assert params_lib.partition(logreg, ("head",), require_shared=False).shared_paths == ()


def test_split_and_merge_on_stacked_leaves_under_vmap_and_grad():
    model = models.mlp((6,), 3, hidden=(8,))
    part = params_lib.partition(_shapes(model), ("head",))
    stacked = jax.vmap(model.init)(jax.random.split(KEY, 4))
    v, u = jax.vmap(part.split)(stacked)
    assert v["head/kernel"].shape == (4, 8, 3) and u["hidden_0/kernel"].shape == (4, 6, 8)
    back = jax.vmap(part.merge)(v, u)
    for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(stacked)):
        np.testing.assert_array_equal(a, b)
    x = jnp.ones((2, 6))
    one_v, one_u = part.split(model.init(KEY))
    grad = jax.grad(lambda vv: jnp.sum(model.apply(part.merge(vv, one_u), {"x": x})))(one_v)
    assert set(grad) == {"head/bias", "head/kernel"}


def test_bad_labels_raise_clear_errors():
    params = _shapes(models.mlp((6,), 3, hidden=(8,)))
    with pytest.raises(ValueError, match=r"personal: \('encoder',\) matches no parameter.*"
                                         r"\['head', 'hidden_0'\]"):
        params_lib.partition(params, ("encoder",))
    with pytest.raises(ValueError, match="matches every parameter, leaving no shared part"):
        params_lib.partition(params, ("head", "hidden_0"))
    with pytest.raises(ValueError, match="not a valid regular expression"):
        params_lib.partition(params, "head[")
    with pytest.raises(ValueError, match="personal: expected a non-empty sequence"):
        params_lib.partition(params, [])
    with pytest.raises(ValueError, match="head: expected"):
        params_lib.partition(params, 3, name="head")
    with pytest.raises(ValueError, match="matches no parameter"):
        params_lib.partition(params, lambda p: False)
