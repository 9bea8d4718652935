"""Model zoo: logistic regression, MLP and the 2-conv "FedAvg CNN".

The CNN is the one PFLlib (`FedAvgCNN`) and the FedFew code use: two 5x5 VALID
convolutions (32 and 64 channels) each followed by ReLU and 2x2 max-pooling, a
512-unit hidden layer and a linear head. For 28x28x1 inputs the flattened size
is 1024, for 32x32x3 it is 1600.

`mlp_bn` and `cnn_bn` add a BatchNorm layer (`bn_i`, PyTorch's defaults:
momentum 0.1, eps 1e-5) after each hidden Dense / conv layer, before the
ReLU, as FedBN's models do; their params are {"params", "batch_stats"}.
"""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax.numpy as jnp

from fedjax_pfl.models.layers import CONV_IMPLS, Conv, max_pool_2x2
from fedjax_pfl.models.model import Model, from_linen


class _MLP(nn.Module):
    hidden: Sequence[int]
    num_classes: int
    activation: str = "relu"

    @nn.compact
    def __call__(self, x, train: bool = False):
        del train
        act = getattr(nn, self.activation)
        x = x.reshape((x.shape[0], -1))
        for i, width in enumerate(self.hidden):
            x = act(nn.Dense(width, name=f"hidden_{i}")(x))
        return nn.Dense(self.num_classes, name="head")(x)


class _CNN(nn.Module):
    num_classes: int
    conv: str = "patches"

    @nn.compact
    def __call__(self, x, train: bool = False):
        del train
        for i, channels in enumerate((32, 64)):
            x = Conv(channels, (5, 5), padding="VALID", impl=self.conv, name=f"conv_{i}")(x)
            x = max_pool_2x2(nn.relu(x))
        x = x.reshape((x.shape[0], -1))
        x = nn.relu(nn.Dense(512, name="hidden_0")(x))
        return nn.Dense(self.num_classes, name="head")(x)


def _batch_norm(x, train, mask, name):
    """BatchNorm over every axis but the last; `mask` [B] picks the rows of the statistics."""
    if mask is not None:
        mask = jnp.broadcast_to(mask.reshape((-1,) + (1,) * (x.ndim - 1)), x.shape)
    return nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5,
                        use_fast_variance=False, name=name)(x, mask=mask)


class _MLPBN(nn.Module):
    hidden: Sequence[int]
    num_classes: int

    @nn.compact
    def __call__(self, x, train: bool = False, mask=None):
        x = x.reshape((x.shape[0], -1))
        for i, width in enumerate(self.hidden):
            x = nn.Dense(width, name=f"hidden_{i}")(x)
            x = nn.relu(_batch_norm(x, train, mask, f"bn_{i}"))
        return nn.Dense(self.num_classes, name="head")(x)


class _CNNBN(nn.Module):
    num_classes: int
    channels: Sequence[int]
    hidden: int
    conv: str = "patches"

    @nn.compact
    def __call__(self, x, train: bool = False, mask=None):
        for i, channels in enumerate(self.channels):
            x = Conv(channels, (3, 3), padding="SAME", impl=self.conv, name=f"conv_{i}")(x)
            x = nn.relu(_batch_norm(x, train, mask, f"bn_{i}"))
            x = max_pool_2x2(x)
        x = x.reshape((x.shape[0], -1))
        x = nn.relu(nn.Dense(self.hidden, name="hidden_0")(x))
        return nn.Dense(self.num_classes, name="head")(x)


def _check(name, value, ok, expected):
    if not ok:
        raise ValueError(f"{name}: expected {expected}, got {value!r}.")


def _check_conv(conv):
    _check("conv", conv, conv in CONV_IMPLS, f"one of {CONV_IMPLS} (see models.layers)")


def _check_classes(num_classes):
    _check("num_classes", num_classes, isinstance(num_classes, int) and num_classes >= 2,
           "an int >= 2")


def logistic_regression(input_shape: Sequence[int], num_classes: int) -> Model:
    """Multinomial logistic regression (one `head` Dense layer)."""
    return mlp(input_shape, num_classes, hidden=())


def mlp(
    input_shape: Sequence[int],
    num_classes: int,
    *,
    hidden: Sequence[int] = (64,),
    activation: str = "relu",
) -> Model:
    """MLP with `hidden` layer widths (`hidden_i`) and a linear `head`.

    Args:
      input_shape: the shape of one example; it is flattened.
      num_classes: logits per example.
      hidden: hidden widths, e.g. (80, 60) for Per-FedAvg's MLP.
      activation: a flax.linen activation name ("relu", "elu", "tanh", ...).
    """
    _check_classes(num_classes)
    _check("hidden", hidden, all(isinstance(h, int) and h > 0 for h in hidden), "positive ints")
    _check("activation", activation, callable(getattr(nn, activation, None)),
           "a flax.linen activation")
    return from_linen(_MLP(tuple(hidden), num_classes, activation), tuple(input_shape))


def cnn(input_shape: Sequence[int] = (28, 28, 1), num_classes: int = 10, *,
        conv: str = "patches") -> Model:
    """The 2-conv FedAvg CNN for [H, W, C] images (28x28x1 or 32x32x3).

    `conv`: "patches" (im2col + matmul, fast on CPU in loops and under vmap)
    or "xla" (`lax.conv_general_dilated`); same params (`models.layers`).
    """
    _check("input_shape", input_shape, len(input_shape) == 3 and min(input_shape[:2]) >= 16,
           "[H, W, C] with H, W >= 16")
    _check_classes(num_classes)
    _check_conv(conv)
    return from_linen(_CNN(num_classes, conv), tuple(input_shape))


def mlp_bn(input_shape: Sequence[int], num_classes: int, *,
           hidden: Sequence[int] = (64,)) -> Model:
    """`mlp` with a BatchNorm (`bn_i`) after each hidden Dense layer, before the ReLU."""
    _check_classes(num_classes)
    _check("hidden", hidden, len(hidden) >= 1 and all(isinstance(h, int) and h > 0
                                                      for h in hidden), "one or more positive ints")
    return from_linen(_MLPBN(tuple(hidden), num_classes), tuple(input_shape))


def cnn_bn(input_shape: Sequence[int] = (28, 28, 1), num_classes: int = 10, *,
           channels: Sequence[int] = (32, 64), hidden: int = 128,
           conv: str = "patches") -> Model:
    """A small CNN for [H, W, C] images: per `channels`, a 3x3 SAME conv, BatchNorm
    (`bn_i`), ReLU and 2x2 max-pooling; then a ReLU Dense of `hidden` units and a `head`.
    `conv` as in `cnn`."""
    _check("input_shape", input_shape, len(input_shape) == 3
           and min(input_shape[:2]) >= 2 ** len(channels), "[H, W, C] with H, W >= 2**#channels")
    _check_classes(num_classes)
    _check("channels", channels, len(channels) >= 1 and all(isinstance(c, int) and c > 0
                                                            for c in channels), "positive ints")
    _check("hidden", hidden, isinstance(hidden, int) and hidden > 0, "a positive int")
    _check_conv(conv)
    return from_linen(_CNNBN(num_classes, tuple(channels), hidden, conv), tuple(input_shape))


MODELS = {"logreg": logistic_regression, "mlp": mlp, "cnn": cnn, "mlp_bn": mlp_bn,
          "cnn_bn": cnn_bn}
