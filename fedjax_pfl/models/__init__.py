"""Models as `Model(init, apply, loss)` triples of pure functions."""

from fedjax_pfl.models.benchmarks import char_lstm, femnist_cnn, resnet, text_lstm
from fedjax_pfl.models.model import (
    TRAIN_MASK,
    Model,
    cross_entropy,
    from_linen,
    num_params,
    per_example_loss,
    sequence_cross_entropy,
)
from fedjax_pfl.models.multimodal import ENCODERS, two_encoder
from fedjax_pfl.models.zoo import MODELS, cnn, cnn_bn, logistic_regression, mlp, mlp_bn

__all__ = [
    "MODELS",
    "Model",
    "TRAIN_MASK",
    "cnn",
    "cnn_bn",
    "cross_entropy",
    "from_linen",
    "logistic_regression",
    "mlp",
    "mlp_bn",
    "num_params",
    "per_example_loss",
]
__all__ += ["ENCODERS", "two_encoder"]
__all__ += ["char_lstm", "femnist_cnn", "resnet", "sequence_cross_entropy", "text_lstm"]

MODELS.update({"femnist_cnn": femnist_cnn, "char_lstm": char_lstm, "text_lstm": text_lstm,
               "resnet": resnet})
