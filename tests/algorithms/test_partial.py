"""FedAlt, FedSim, FedRep, FedPer: non-default paths against the naive loop; validation."""

import functools

import jax
import numpy as np
import pytest

from fedjax_pfl import data, models, testing
from fedjax_pfl.algorithms import ALGORITHMS, fedalt, fedper, fedrep, fedsim
from fedjax_pfl.algorithms.partial import partial_pfl

MODEL = models.mlp((6,), 3, hidden=(8,))
KEY = jax.random.key(5)


@pytest.mark.slow
@pytest.mark.parametrize("name, overrides", [
    ("fedalt", {"personal_epochs": 2, "weighting": "uniform"}),
    ("fedsim", {"personal": r"^hidden_0/kernel$", "weighting": "uniform"}),
    ("fedrep", {"personal": ("hidden_0",), "personal_steps": 2}),
])
def test_non_default_paths_equal_naive_loop(tiny_train, name, overrides):
    config = {"batch_size": 4, "local_epochs": 1, "client_lr": 0.2, "clients_per_round": 4,
              **overrides}
    algo = ALGORITHMS[name](MODEL, **config)
    round_fn = jax.jit(algo.round)
    state = algo.init(jax.random.key(0), tiny_train)
    for r in range(2):
        key = jax.random.fold_in(KEY, r)
        want, want_metrics = testing.naive_round(name, MODEL, state, tiny_train, key, **config)
        state, metrics = round_fn(state, tiny_train, key)
        testing.assert_trees_close(state, want, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(metrics["drift"], want_metrics["drift"], rtol=1e-5)
        assert metrics["drift"] > 0


def test_personal_block_is_what_the_labels_say(tiny_train):
    state = fedsim(MODEL, personal=r"kernel$").init(jax.random.key(0), tiny_train)
    assert set(state.client_personal) == {"head/kernel", "hidden_0/kernel"}
    assert set(state.shared) == {"head/bias", "hidden_0/bias"}
    state = fedper(MODEL).init(jax.random.key(0), tiny_train)
    assert set(state.client_personal) == {"head/bias", "head/kernel"}


@pytest.mark.parametrize("factory, kwargs, name", [
    (fedalt, {"personal": ("encoder",)}, "personal"),
    (fedsim, {"personal": lambda p: True}, "personal"),
    (fedrep, {"personal": ("nope",)}, "personal"),
    (fedalt, {"personal_epochs": -1}, "personal_epochs"),
    (fedalt, {"personal_epochs": 1, "personal_steps": 2}, "personal_epochs"),
    (functools.partial(partial_pfl, mode="simultaneous"), {"personal_epochs": 2},
     "personal_steps"),
    (functools.partial(partial_pfl, mode="both"), {}, "mode"),
    (fedper, {"weighting": "size"}, "weighting"),
    (fedalt, {"client_lr": -0.1}, "client_lr"),
])
def test_bad_arguments_raise_before_compile(factory, kwargs, name):
    with pytest.raises(ValueError, match=name):
        factory(MODEL, **kwargs)


@pytest.mark.parametrize("factory", [fedrep, fedper])
def test_old_head_argument_warns_and_equals_personal(tiny_train, factory):
    with pytest.warns(DeprecationWarning, match="'head' is deprecated; pass 'personal'"):
        old = factory(MODEL, head=("hidden_0",), clients_per_round=4)
    new = factory(MODEL, personal=("hidden_0",), clients_per_round=4)
    states = [algo.round(algo.init(jax.random.key(0), tiny_train), tiny_train, KEY)
              for algo in (old, new)]
    testing.assert_trees_close(states[0], states[1], rtol=0, atol=0)
    with pytest.raises(TypeError, match="both 'head' and 'personal'"):
        factory(MODEL, head=("head",), personal=("head",))


def test_multimodal_dataset_and_two_encoder_model():
    train, test, info = data.multimodal_synthetic(8, dims=(10, 4), num_classes=3, seed=1,
                                                  examples=(10, 30), noisy_fraction=0.5)
    again, _, _ = data.multimodal_synthetic(8, dims=(10, 4), num_classes=3, seed=1,
                                            examples=(10, 30), noisy_fraction=0.5)
    testing.assert_trees_close(train, again, rtol=0, atol=0)
    assert train.examples["x_a"].shape[::2] == (8, 10) and train.examples["x_b"].shape[2] == 4
    assert (info["noisy_modality"] >= 0).sum() == 4
    noisy = np.flatnonzero(info["noisy_modality"] >= 0)
    levels = info["noise_levels"]
    assert np.all(levels[noisy].max(1) > 4 * levels[noisy].min(1))
    assert int(train.num_examples.min()) >= 7 and int(test.num_examples.min()) >= 2
    model = models.two_encoder(info["dims"], 3, code=4, hidden=5)
    algo = ALGORITHMS["fedapm"](model, personal=models.ENCODERS, clients_per_round=3,
                                batch_size=8, local_epochs=1)
    state = algo.init(jax.random.key(0), train)
    assert set(state.client_personal) == {"encoder_a/bias", "encoder_a/kernel",
                                          "encoder_b/bias", "encoder_b/kernel"}
    assert set(state.shared) == {"fusion/bias", "fusion/kernel", "head/bias", "head/kernel"}
    testing.check_algorithm_does_not_smoke(algo, train, test)
    with pytest.raises(ValueError, match="dims"):
        models.two_encoder((3,), 2)
    with pytest.raises(ValueError, match="examples"):
        data.multimodal_synthetic(4, examples=(5, 2))
