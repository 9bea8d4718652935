"""models.layers: the im2col convolution and the reshape max-pool against flax's own layers."""

import flax.linen as nn
import jax
import numpy as np
import pytest

import fedjax_pfl as fp
from fedjax_pfl.models import benchmarks as zoo
from fedjax_pfl.models.layers import Conv, max_pool_2x2


@pytest.mark.parametrize("kernel,strides,padding,shape", [
    ((5, 5), (1, 1), "VALID", (2, 12, 11, 3)),
    ((5, 5), (1, 1), "SAME", (2, 9, 10, 2)),
    ((3, 3), (2, 2), "SAME", (3, 9, 8, 4)),
    ((1, 1), (2, 2), "SAME", (1, 7, 7, 5)),
    ((3, 2), (2, 1), "VALID", (2, 8, 9, 1)),
])
@pytest.mark.parametrize("impl", ["patches", "xla"])
def test_conv_matches_flax_conv(kernel, strides, padding, shape, impl):
    x = jax.random.normal(jax.random.key(0), shape)
    ref = nn.Conv(6, kernel, strides, padding=padding)
    ours = Conv(6, kernel, strides, padding, impl=impl)
    params = ref.init(jax.random.key(1), x)
    # same parameter tree and the same init values as flax.linen.Conv
    jax.tree.map(np.testing.assert_array_equal, ours.init(jax.random.key(1), x), params)
    params = jax.tree.map(lambda p: p + 0.1, params)  # a non-zero bias too
    want = ref.apply(params, x)
    np.testing.assert_allclose(ours.apply(params, x), want, rtol=1e-5, atol=1e-5)
    # gradients too (the backward of the patches is a sum of shifted slices)
    loss = lambda m: lambda p: (m.apply(p, x) ** 2).sum()
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4),
                 jax.grad(loss(ours))(params), jax.grad(loss(ref))(params))


@pytest.mark.parametrize("shape", [(2, 8, 8, 3), (1, 9, 7, 2)])
def test_max_pool_matches_flax(shape):
    x = jax.random.normal(jax.random.key(0), shape)
    want = nn.max_pool(x, (2, 2), strides=(2, 2))
    np.testing.assert_array_equal(max_pool_2x2(x), want)
    np.testing.assert_allclose(jax.grad(lambda v: (max_pool_2x2(v) ** 3).sum())(x),
                               jax.grad(lambda v: (nn.max_pool(v, (2, 2), strides=(2, 2)) ** 3)
                                        .sum())(x), rtol=1e-6)


@pytest.mark.parametrize("build,shape", [
    (lambda conv: fp.models.cnn((17, 16, 3), 10, conv=conv), (17, 16, 3)),
    (lambda conv: fp.models.cnn_bn((8, 8, 3), 10, channels=(4, 8), hidden=8, conv=conv),
     (8, 8, 3)),
    (lambda conv: zoo.femnist_cnn((12, 12, 1), 62, channels=(4, 8), hidden=16, conv=conv),
     (12, 12, 1)),
    (lambda conv: zoo.resnet((12, 12, 3), 10, widths=(4, 8), blocks=(1, 1), conv=conv),
     (12, 12, 3)),
])
def test_models_agree_across_conv_impls(build, shape):
    patches, xla = build("patches"), build("xla")
    params = patches.init(jax.random.key(0))
    jax.tree.map(np.testing.assert_array_equal, params, xla.init(jax.random.key(0)))
    x = jax.random.normal(jax.random.key(1), (4, *shape))
    np.testing.assert_allclose(patches.apply(params, {"x": x}, None),
                               xla.apply(params, {"x": x}, None), rtol=1e-4, atol=1e-5)


def test_conv_option_is_checked():
    with pytest.raises(ValueError, match="conv: expected one of"):
        fp.models.cnn((28, 28, 1), 10, conv="fft")
