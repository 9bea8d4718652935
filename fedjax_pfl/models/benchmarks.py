"""Models of the standard PFL benchmarks (LEAF FEMNIST / Shakespeare / Sent140, StackOverflow,
CIFAR), each a `Model` built with `from_linen`; the last layer is named `head`.

* `femnist_cnn`: LEAF's FEMNIST CNN (`models/femnist/cnn.py`): two 5x5 SAME
  convolutions (32, 64) each with ReLU and 2x2 max-pooling, a 2048-unit ReLU
  layer and a linear head (62 classes); 6,603,710 parameters.
* `char_lstm`: LEAF's Shakespeare model (`models/shakespeare/stacked_lstm.py`):
  an 8-dim character embedding, 2 stacked 256-unit LSTMs and a linear head to
  the 80-character vocabulary. By default it predicts ONE next character from
  the last step of an 80-character window (x int [B, 80], y [B]); with
  `per_token=True` it predicts the next character at every position, like
  fedjax / TFF Shakespeare (x, y int [B, T]), tokens whose label is `pad_id`
  masked out of the loss and of the evaluation.
* `text_lstm`: a classifier of token-id sequences (Sent140, StackOverflow tag
  prediction): an embedding, an LSTM (or nothing, `bag_of_words=True`), the
  mean over the non-pad positions (`pad_id`, right padding) and a linear head.
* `resnet`: a CIFAR ResNet with GroupNorm (no running statistics): a 3x3 stem,
  stages of basic blocks (default one block per stage of 16/32/64 channels:
  ResNet-8), global average pooling and a linear head.

Token ids must lie in [0, vocab_size); the embedding cannot check them under
jit (an id outside gives NaN logits).
"""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax.numpy as jnp

from fedjax_pfl.models.layers import Conv, max_pool_2x2
from fedjax_pfl.models.model import Model, cross_entropy, from_linen, sequence_cross_entropy
from fedjax_pfl.models.zoo import _check, _check_classes, _check_conv


def _positive_ints(name, values, length=None):
    values = tuple(values) if isinstance(values, (tuple, list)) else values
    ok = isinstance(values, tuple) and len(values) > 0 and all(
        isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in values)
    if length is not None:
        ok = ok and len(values) == length
    _check(name, values, ok, "a non-empty sequence of positive ints" +
           ("" if length is None else f" of length {length}"))
    return values


def _positive_int(name, value):
    _check(name, value, isinstance(value, int) and not isinstance(value, bool) and value > 0,
           "a positive int")
    return value


# ---------------------------------------------------------------------------- FEMNIST CNN


class _FemnistCNN(nn.Module):
    num_classes: int
    image_shape: tuple[int, int, int]
    channels: tuple[int, ...] = (32, 64)
    hidden: int = 2048
    conv: str = "patches"

    @nn.compact
    def __call__(self, x, train: bool = False):
        del train
        x = x.reshape((x.shape[0], *self.image_shape))
        for i, c in enumerate(self.channels):
            x = Conv(c, (5, 5), padding="SAME", impl=self.conv, name=f"conv_{i}")(x)
            x = max_pool_2x2(nn.relu(x))
        x = x.reshape((x.shape[0], -1))
        x = nn.relu(nn.Dense(self.hidden, name="hidden_0")(x))
        return nn.Dense(self.num_classes, name="head")(x)


def femnist_cnn(input_shape: Sequence[int] = (28, 28, 1), num_classes: int = 62, *,
                channels: Sequence[int] = (32, 64), hidden: int = 2048,
                conv: str = "patches") -> Model:
    """LEAF's FEMNIST CNN for [28, 28, 1] images (or flat [784] rows, as LEAF stores them).

    Args:
      input_shape: [H, W, C] or [H * W] (a square one-channel image).
      num_classes: 62 for FEMNIST.
      channels: the convolutions' widths (LEAF: 32, 64).
      hidden: the dense layer's width (LEAF: 2048).
      conv: "patches" (im2col + matmul, fast on CPU in loops and under vmap)
        or "xla"; same params (`models.layers`).
    """
    shape = tuple(input_shape)
    if len(shape) == 1:
        side = int(round(shape[0] ** 0.5))
        _check("input_shape", input_shape, side * side == shape[0], "[H, W, C] or a square [H*W]")
        image = (side, side, 1)
    else:
        _check("input_shape", input_shape, len(shape) == 3, "[H, W, C] or a square [H*W]")
        image = shape
    _check("input_shape", input_shape, min(image[:2]) >= 4, "an image of at least 4x4")
    _check_classes(num_classes)
    channels = _positive_ints("channels", channels)
    _positive_int("hidden", hidden)
    _check_conv(conv)
    return from_linen(_FemnistCNN(num_classes, image, channels, hidden, conv), shape)


# ---------------------------------------------------------------------------- LSTMs


class _StackedLSTM(nn.Module):
    """Embedding and stacked LSTMs: int ids [B, T] -> outputs [B, T, hidden]."""

    vocab_size: int
    embed_dim: int
    hidden: int
    num_layers: int

    @nn.compact
    def __call__(self, ids):
        x = nn.Embed(self.vocab_size, self.embed_dim, name="embed")(ids)
        for i in range(self.num_layers):
            x = nn.RNN(nn.OptimizedLSTMCell(self.hidden), name=f"lstm_{i}")(x)
        return x


class _CharLSTM(nn.Module):
    num_classes: int
    vocab_size: int
    embed_dim: int = 8
    hidden: int = 256
    num_layers: int = 2
    per_token: bool = False

    @nn.compact
    def __call__(self, ids, train: bool = False):
        del train
        x = _StackedLSTM(self.vocab_size, self.embed_dim, self.hidden, self.num_layers,
                         name="encoder")(ids)
        if not self.per_token:
            x = x[:, -1]
        return nn.Dense(self.num_classes, name="head")(x)


def char_lstm(input_shape: Sequence[int] = (80,), num_classes: int = 80, *,
              vocab_size: int | None = None, embed_dim: int = 8, hidden: int = 256,
              num_layers: int = 2, per_token: bool = False, pad_id: int = 0) -> Model:
    """LEAF's Shakespeare character LSTM over int ids x [B, T].

    Args:
      input_shape: (T,), the window length (LEAF: 80).
      num_classes: the output vocabulary (LEAF: 80 characters).
      vocab_size: the input vocabulary (None: `num_classes`, as in LEAF).
      embed_dim, hidden, num_layers: LEAF: 8, 256, 2.
      per_token: False: one next character per window from the last step
        (logits [B, C], labels y [B]); True: the next character at every
        position (logits [B, T, C], labels y [B, T]), tokens with
        `y == pad_id` not counted; the loss is each example's mean over its
        counted tokens, and evaluation counts tokens (`evaluate_client`).
      pad_id: the padding id (per_token only); it must be a valid class.
    """
    shape = tuple(input_shape)
    _check("input_shape", input_shape, len(shape) == 1 and shape[0] >= 1, "(T,)")
    _check_classes(num_classes)
    vocab_size = num_classes if vocab_size is None else _positive_int("vocab_size", vocab_size)
    for name, v in (("embed_dim", embed_dim), ("hidden", hidden), ("num_layers", num_layers)):
        _positive_int(name, v)
    module = _CharLSTM(num_classes, vocab_size, embed_dim, hidden, num_layers, bool(per_token))
    if not per_token:
        return from_linen(module, shape, input_dtype=jnp.int32)
    _check("pad_id", pad_id, isinstance(pad_id, int) and 0 <= pad_id < num_classes,
           f"an int in [0, {num_classes})")

    def token_mask(batch):
        return batch["y"] != pad_id

    def loss(logits, batch):
        return sequence_cross_entropy(logits, batch["y"], token_mask(batch))

    return from_linen(module, shape, input_dtype=jnp.int32, loss=loss, token_mask=token_mask)


class _TextClassifier(nn.Module):
    num_classes: int
    vocab_size: int
    embed_dim: int
    hidden: int
    num_layers: int
    bag_of_words: bool
    pad_id: int

    @nn.compact
    def __call__(self, ids, train: bool = False):
        del train
        if self.bag_of_words:
            x = nn.Embed(self.vocab_size, self.embed_dim, name="embed")(ids)
        else:
            x = _StackedLSTM(self.vocab_size, self.embed_dim, self.hidden, self.num_layers,
                             name="encoder")(ids)
        mask = (ids != self.pad_id).astype(x.dtype)[..., None]
        x = jnp.sum(x * mask, 1) / jnp.maximum(jnp.sum(mask, 1), 1.0)
        return nn.Dense(self.num_classes, name="head")(x)


def text_lstm(input_shape: Sequence[int] = (25,), num_classes: int = 2, *,
              vocab_size: int = 10000, embed_dim: int = 100, hidden: int = 100,
              num_layers: int = 1, bag_of_words: bool = False, pad_id: int = 0) -> Model:
    """Text classifier over right-padded int token ids x [B, T] (Sent140, StackOverflow).

    Embedding, `num_layers` LSTMs of width `hidden` (none with
    `bag_of_words=True`), the mean over the positions whose id is not
    `pad_id` (0 for an all-pad row) and a linear `head`.

    Args:
      input_shape: (T,), the padded sequence length.
      num_classes: 2 for Sent140's sentiment, the tag count for StackOverflow.
      vocab_size: ids lie in [0, vocab_size), `pad_id` included.
      embed_dim, hidden, num_layers: the widths and depth.
      bag_of_words: mean of the embeddings instead of the LSTM outputs.
      pad_id: the padding id.
    """
    shape = tuple(input_shape)
    _check("input_shape", input_shape, len(shape) == 1 and shape[0] >= 1, "(T,)")
    _check_classes(num_classes)
    for name, v in (("vocab_size", vocab_size), ("embed_dim", embed_dim), ("hidden", hidden),
                    ("num_layers", num_layers)):
        _positive_int(name, v)
    _check("pad_id", pad_id, isinstance(pad_id, int) and 0 <= pad_id < vocab_size,
           f"an int in [0, {vocab_size})")
    module = _TextClassifier(num_classes, vocab_size, embed_dim, hidden, num_layers,
                             bool(bag_of_words), pad_id)
    return from_linen(module, shape, input_dtype=jnp.int32, loss=cross_entropy)


# ---------------------------------------------------------------------------- ResNet


class _BasicBlock(nn.Module):
    channels: int
    stride: int
    groups: int
    conv: str

    @nn.compact
    def __call__(self, x):
        def norm(name):
            return nn.GroupNorm(num_groups=_groups(self.groups, self.channels), name=name)

        stride = (self.stride, self.stride)
        y = Conv(self.channels, (3, 3), stride, "SAME", False, self.conv, name="conv_0")(x)
        y = nn.relu(norm("norm_0")(y))
        y = Conv(self.channels, (3, 3), padding="SAME", use_bias=False, impl=self.conv,
                 name="conv_1")(y)
        y = norm("norm_1")(y)
        if x.shape[-1] != self.channels or self.stride != 1:
            x = Conv(self.channels, (1, 1), stride, "SAME", False, self.conv, name="shortcut")(x)
            x = norm("shortcut_norm")(x)
        return nn.relu(x + y)


def _groups(groups: int, channels: int) -> int:
    """The largest divisor of `channels` that is at most `groups`."""
    g = min(groups, channels)
    while channels % g:
        g -= 1
    return g


class _ResNet(nn.Module):
    num_classes: int
    widths: tuple[int, ...]
    blocks: tuple[int, ...]
    groups: int
    conv: str = "patches"

    @nn.compact
    def __call__(self, x, train: bool = False):
        del train
        x = Conv(self.widths[0], (3, 3), padding="SAME", use_bias=False, impl=self.conv,
                 name="stem")(x)
        x = nn.relu(nn.GroupNorm(num_groups=_groups(self.groups, self.widths[0]),
                                 name="stem_norm")(x))
        for s, (width, count) in enumerate(zip(self.widths, self.blocks)):
            for b in range(count):
                stride = 2 if s > 0 and b == 0 else 1
                x = _BasicBlock(width, stride, self.groups, self.conv,
                                name=f"stage_{s}_block_{b}")(x)
        x = jnp.mean(x, axis=(1, 2))
        return nn.Dense(self.num_classes, name="head")(x)


def resnet(input_shape: Sequence[int] = (32, 32, 3), num_classes: int = 10, *,
           widths: Sequence[int] = (16, 32, 64), blocks: Sequence[int] = (1, 1, 1),
           groups: int = 2, conv: str = "patches") -> Model:
    """A CIFAR ResNet with GroupNorm for [H, W, C] images.

    The defaults give ResNet-8 (a stem, three stages of one basic block, the
    head); `blocks=(3, 3, 3)` gives ResNet-20, and `widths=(64, 128, 256, 512),
    blocks=(2, 2, 2, 2)` a ResNet-18 (with a 3x3 stem, as on CIFAR).

    Args:
      input_shape: [H, W, C].
      num_classes: logits per image.
      widths: channels per stage (stages after the first halve H and W).
      blocks: basic blocks per stage (same length as `widths`).
      groups: GroupNorm groups (at most; the largest divisor of the width).
      conv: "patches" or "xla", as in `femnist_cnn`.
    """
    shape = tuple(input_shape)
    _check("input_shape", input_shape, len(shape) == 3, "[H, W, C]")
    _check_classes(num_classes)
    widths = _positive_ints("widths", widths)
    blocks = _positive_ints("blocks", blocks, len(widths))
    _positive_int("groups", groups)
    _check_conv(conv)
    return from_linen(_ResNet(num_classes, widths, blocks, groups, conv), shape)
