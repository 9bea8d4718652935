"""Convolution and pooling layers that run fast on CPU under `lax.scan` and `vmap`.

XLA:CPU runs a convolution at full speed only outside loops and without a
batch of kernels. A client's local steps are a `lax.scan` (a while loop) and
the clients are a `vmap` (per-client kernels: a grouped convolution). Measured
on the FedAvg CNN (28x28x1, batch 32, 2-core CPU; `benchmarks/cnn_speed.py`):
one SGD step takes 12.1 ms unrolled but 107 ms inside a scan, and 33.5 ms per
client vmapped over 10 clients. As im2col patches times the kernel (one
matmul; a batched matmul under vmap) it takes 10.3, 10.5 and 12.5 ms, and a
FedAvg round of 50 clients 12x less time than with `lax.conv`.

`Conv` keeps `flax.linen.Conv`'s parameters (`kernel` [kh, kw, in, out] with
LeCun-normal init, `bias` zeros), so a model's params, init values and
checkpoints do not depend on `impl`; outputs agree to float32 rounding (the
sum runs in another order). `max_pool_2x2` is `nn.max_pool(x, (2, 2),
strides=(2, 2))` as a reshape and a max (XLA:CPU's select-and-scatter
gradient of `max_pool` is slow); ties share the gradient instead of giving it
to the first maximum.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

CONV_IMPLS = ("patches", "xla")


class Conv(nn.Module):
    """2-D convolution over [B, H, W, C] with `nn.Conv`'s parameters.

    `padding` "SAME" or "VALID"; `impl` "patches" (im2col + matmul, default)
    or "xla" (`lax.conv_general_dilated`, what `nn.Conv` runs).
    """

    features: int
    kernel_size: tuple[int, int]
    strides: tuple[int, int] = (1, 1)
    padding: str = "VALID"
    use_bias: bool = True
    impl: str = "patches"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        (kh, kw), (sh, sw) = self.kernel_size, self.strides
        kernel = self.param("kernel", nn.initializers.lecun_normal(),
                            (kh, kw, x.shape[-1], self.features))
        if self.impl == "xla":
            y = jax.lax.conv_general_dilated(x, kernel, self.strides, self.padding,
                                             dimension_numbers=("NHWC", "HWIO", "NHWC"))
        else:
            if self.padding == "SAME":
                x = jnp.pad(x, ((0, 0), _same_pad(x.shape[1], kh, sh),
                                _same_pad(x.shape[2], kw, sw), (0, 0)))
            h, w = (x.shape[1] - kh) // sh + 1, (x.shape[2] - kw) // sw + 1
            patches = jnp.concatenate(
                [x[:, i:i + (h - 1) * sh + 1:sh, j:j + (w - 1) * sw + 1:sw, :]
                 for i in range(kh) for j in range(kw)], axis=-1)  # [B, h, w, kh*kw*C]
            y = patches @ kernel.reshape(-1, self.features)
        if self.use_bias:
            bias = self.param("bias", nn.initializers.zeros, (self.features,))
            y = y + bias.reshape((1,) * (y.ndim - 1) + (-1,))
        return y


def _same_pad(size: int, k: int, s: int) -> tuple[int, int]:
    """XLA's SAME padding (more on the high side) for one spatial axis."""
    total = max((-(-size // s) - 1) * s + k - size, 0)
    return total // 2, total - total // 2


def max_pool_2x2(x: jax.Array) -> jax.Array:
    """2x2 max pooling with stride 2 over [B, H, W, C] (an odd last row/column is dropped)."""
    b, h, w, c = x.shape
    x = x[:, : h - h % 2, : w - w % 2]
    return x.reshape(b, h // 2, 2, w // 2, 2, c).max(axis=(2, 4))
