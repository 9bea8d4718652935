"""A two-encoder fusion model for two-modality inputs ("x_a", "x_b").

Top-level param names: `encoder_a`, `encoder_b` (one hidden Dense + ReLU per
modality: the parts FedAPM keeps personal), `fusion` (Dense + ReLU on the
concatenated codes) and `head` (the classifier); fusion and head are shared
in the intended split `personal=("encoder_a", "encoder_b")`.
"""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax.numpy as jnp

from fedjax_pfl.models.model import Model, cross_entropy

ENCODERS = ("encoder_a", "encoder_b")


class _TwoEncoder(nn.Module):
    code: int
    hidden: int
    num_classes: int

    @nn.compact
    def __call__(self, x_a, x_b):
        a = nn.relu(nn.Dense(self.code, name="encoder_a")(x_a))
        b = nn.relu(nn.Dense(self.code, name="encoder_b")(x_b))
        z = nn.relu(nn.Dense(self.hidden, name="fusion")(jnp.concatenate([a, b], -1)))
        return nn.Dense(self.num_classes, name="head")(z)


def two_encoder(dims: Sequence[int], num_classes: int, *, code: int = 16,
                hidden: int = 32) -> Model:
    """Two modality encoders, a fusion layer and a head.

    Args:
      dims: (d_a, d_b), the feature sizes of `batch["x_a"]` and `batch["x_b"]`.
      num_classes: logits per example.
      code: width of each encoder's output.
      hidden: width of the fusion layer.
    """
    ok = len(dims) == 2 and all(isinstance(d, int) and d >= 1 for d in dims)
    if not ok:
        raise ValueError(f"dims: expected two positive ints (d_a, d_b), got {dims!r}.")
    for name, v, lo in (("num_classes", num_classes, 2), ("code", code, 1),
                        ("hidden", hidden, 1)):
        if not (isinstance(v, int) and v >= lo):
            raise ValueError(f"{name}: expected an int >= {lo}, got {v!r}.")
    module = _TwoEncoder(code, hidden, num_classes)
    dummy = (jnp.zeros((1, dims[0]), jnp.float32), jnp.zeros((1, dims[1]), jnp.float32))

    def init(key):
        return module.init(key, *dummy)["params"]

    def apply(params, batch, key=None):
        del key
        return module.apply({"params": params}, batch["x_a"], batch["x_b"])

    return Model(init=init, apply=apply, loss=cross_entropy)
