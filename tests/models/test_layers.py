"""models.layers: the im2col convolution and the reshape max-pool against flax's own layers."""

import flax.linen as nn
import jax
import numpy as np
import pytest

import fedjax_pfl as fp
from fedjax_pfl.models import benchmarks as zoo
from fedjax_pfl.models.layers import Conv, max_pool_2x2


@pytest.mark.parametrize("kernel,strides,padding,shape,impl", [
    ((5, 5), (1, 1), "VALID", (2, 12, 11, 3), "patches"),
    ((5, 5), (1, 1), "SAME", (2, 9, 10, 2), "patches"),
    ((3, 3), (2, 2), "SAME", (3, 9, 8, 4), "patches"),
    ((1, 1), (2, 2), "SAME", (1, 7, 7, 5), "patches"),
    ((3, 2), (2, 1), "VALID", (2, 8, 9, 1), "patches"),
    ((3, 3), (2, 2), "SAME", (3, 9, 8, 4), "xla"),
])
def test_conv_matches_flax_conv(kernel, strides, padding, shape, impl):
    x = jax.random.normal(jax.random.key(0), shape)
    ref = nn.Conv(6, kernel, strides, padding=padding)
    ours = Conv(6, kernel, strides, padding, impl=impl)
    params = jax.jit(ref.init)(jax.random.key(1), x)
    # same parameter tree and the same init values as flax.linen.Conv
    jax.tree.map(np.testing.assert_array_equal, jax.jit(ours.init)(jax.random.key(1), x), params)
    params = jax.tree.map(lambda p: p + 0.1, params)  # a non-zero bias too
    # outputs and gradients (the backward of the patches is a sum of shifted slices)
    run = lambda m: jax.jit(lambda p: (m.apply(p, x), jax.grad(lambda q: (m.apply(q, x) ** 2)
                                                              .sum())(p)))(params)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4),
                 run(ours), run(ref))


@pytest.mark.parametrize("shape", [(2, 8, 8, 3), (1, 9, 7, 2)])
def test_max_pool_matches_flax(shape):
    x = jax.random.normal(jax.random.key(0), shape)
    flax_pool = lambda v: nn.max_pool(v, (2, 2), strides=(2, 2))
    run = lambda pool: jax.jit(lambda v: (pool(v), jax.grad(lambda u: (pool(u) ** 3).sum())(v)))(x)
    (ours, d_ours), (want, d_want) = run(max_pool_2x2), run(flax_pool)
    np.testing.assert_array_equal(ours, want)
    np.testing.assert_allclose(d_ours, d_want, rtol=1e-6)


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
    shapes = jax.eval_shape(patches.init, jax.random.key(0))
    assert shapes == jax.eval_shape(xla.init, jax.random.key(0))  # the same params
    rng = np.random.default_rng(0)  # random values (a flax init compiles slowly)
    params = jax.tree.map(lambda s: 0.3 * rng.standard_normal(s.shape).astype(s.dtype), shapes)
    batch = {"x": rng.standard_normal((4, *shape)).astype(np.float32)}
    logits = lambda m: jax.jit(lambda p: m.apply(p, batch, None))(params)
    want = logits(xla)  # logits of up to ~10^2 here: float32 sums agree to ~1e-6 of that
    np.testing.assert_allclose(logits(patches), want, atol=1e-5 * np.abs(want).max())


def test_conv_option_is_checked():
    with pytest.raises(ValueError, match="conv: expected one of"):
        fp.models.cnn((28, 28, 1), 10, conv="fft")
