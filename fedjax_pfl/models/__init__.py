"""Models as `Model(init, apply, loss)` triples of pure functions."""

from fedjax_pfl.models.model import Model, cross_entropy, from_linen, num_params, per_example_loss
from fedjax_pfl.models.multimodal import ENCODERS, two_encoder
from fedjax_pfl.models.zoo import MODELS, cnn, logistic_regression, mlp

__all__ = [
    "MODELS",
    "Model",
    "cnn",
    "cross_entropy",
    "from_linen",
    "logistic_regression",
    "mlp",
    "num_params",
    "per_example_loss",
]
__all__ += ["ENCODERS", "two_encoder"]
