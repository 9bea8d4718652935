"""SCAFFOLD, HypCluster, FedEM, LG-FedAvg: reductions to FedAvg and their own invariants."""

import jax
import numpy as np
import optax
import pytest

from fedjax_pfl import models, testing
from fedjax_pfl.algorithms import ALGORITHMS

MODEL = models.mlp((6,), 3, hidden=(8,))
CONFIG = {"batch_size": 4, "client_lr": 0.1}


def run(algo, train, rounds, seed=0):
    state = algo.init(jax.random.key(seed), train)
    round_fn = jax.jit(algo.round)
    for r in range(rounds):
        state, metrics = round_fn(state, train, jax.random.fold_in(jax.random.key(9), r))
    return state, metrics


def test_scaffold_with_one_local_step_and_full_participation_is_fedavg(tiny_train):
    """With one step, uniform weights and every client, sum_i (c - c_i) = 0 over the
    clients with data, so the corrections cancel in the average every round."""
    config = {**CONFIG, "local_steps": 1, "weighting": "uniform"}
    got, got_m = run(ALGORITHMS["scaffold"](MODEL, **config), tiny_train, 3)
    want, want_m = run(ALGORITHMS["fedavg"](MODEL, **config), tiny_train, 3)
    testing.assert_trees_close(got.params, want.params, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got_m["train_loss"], want_m["train_loss"], rtol=1e-5)
    assert any(np.abs(np.asarray(a)).max() > 0 for a in jax.tree.leaves(got.control))


def test_scaffold_first_round_is_fedavg_and_c_is_the_mean_of_the_c_i(tiny_train):
    config = {**CONFIG, "local_epochs": 2, "clients_per_round": 5}
    algo = ALGORITHMS["scaffold"](MODEL, **config)
    one, _ = run(algo, tiny_train, 1)  # c = c_i = 0: no correction yet
    fedavg, _ = run(ALGORITHMS["fedavg"](MODEL, **config, weighting="uniform"), tiny_train, 1)
    testing.assert_trees_close(one.params, fedavg.params, rtol=1e-5, atol=1e-6)
    state, _ = run(algo, tiny_train, 4)
    has_data = np.asarray(tiny_train.num_examples) > 0
    for c, c_i in zip(jax.tree.leaves(state.control), jax.tree.leaves(state.client_control)):
        np.testing.assert_allclose(c, np.asarray(c_i)[has_data].mean(0), atol=1e-6)
        np.testing.assert_array_equal(np.asarray(c_i)[~has_data], 0.0)


@pytest.mark.slow
def test_hypcluster_with_one_hypothesis_is_fedavg(tiny_train, tiny_test):
    config = {**CONFIG, "local_epochs": 2, "clients_per_round": 5}
    algo = ALGORITHMS["hypcluster"](MODEL, num_models=1, init="shared", **config)
    got, got_m = run(algo, tiny_train, 3)
    want, want_m = run(ALGORITHMS["fedavg"](MODEL, **config), tiny_train, 3)
    testing.assert_trees_close(jax.tree.map(lambda a: a[0], got.params), want.params,
                               rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got_m["train_loss"], want_m["train_loss"], rtol=1e-5)
    np.testing.assert_array_equal(algo.evaluate(got, tiny_train, tiny_test)["model"], 0.0)


@pytest.mark.slow
def test_hypcluster_assigns_sampled_clients_to_their_min_loss_hypothesis(tiny_train):
    algo = ALGORITHMS["hypcluster"](MODEL, num_models=2, clients_per_round=5, **CONFIG)
    state = algo.init(jax.random.key(0), tiny_train)
    new, _ = jax.jit(algo.round)(state, tiny_train, jax.random.key(3))
    assignment = np.asarray(new.assignment)
    for i in range(tiny_train.num_clients):
        n = int(tiny_train.num_examples[i])
        if assignment[i] < 0:
            continue
        batch = jax.tree.map(lambda a, n=n, i=i: a[i, :n], tiny_train.examples)
        losses = [float(MODEL.loss(MODEL.apply(jax.tree.map(lambda a, k=k: a[k], state.params),
                                               batch, None), batch).mean()) for k in range(2)]
        assert assignment[i] == int(np.argmin(losses))
    assert (assignment >= 0).sum() <= 5 and (assignment >= 0).any()


@pytest.mark.slow
def test_fedem_with_one_component_is_fedavg(tiny_train, tiny_test):
    config = {**CONFIG, "local_epochs": 2, "clients_per_round": 5}
    algo = ALGORITHMS["fedem"](MODEL, num_models=1, init="shared", **config)
    got, got_m = run(algo, tiny_train, 3)
    fedavg = ALGORITHMS["fedavg"](MODEL, **config)
    want, want_m = run(fedavg, tiny_train, 3)
    testing.assert_trees_close(jax.tree.map(lambda a: a[0], got.params), want.params,
                               rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got_m["train_loss"], want_m["train_loss"], rtol=1e-5)
    np.testing.assert_array_equal(got.mixture, 1.0)
    testing.assert_trees_close(algo.evaluate(got, tiny_train, tiny_test),
                               fedavg.evaluate(want, tiny_train, tiny_test), rtol=1e-4, atol=1e-5)


@pytest.mark.slow  # ~13 s; FedEM's round is checked against its naive loop in test_common
def test_fedem_mixture_weights_are_the_mean_responsibilities(tiny_train):
    """With client_lr = 0 only the E/M steps act: pi_i is the mean over client i's
    examples of q(k) ∝ pi_ik exp(-loss_k), a distribution over the K components."""
    algo = ALGORITHMS["fedem"](MODEL, num_models=2, **{**CONFIG, "client_lr": 0.0})
    state = algo.init(jax.random.key(0), tiny_train)
    new, _ = jax.jit(algo.round)(state, tiny_train, jax.random.key(1))
    testing.assert_trees_close(new.params, state.params, rtol=0, atol=0)
    for i in range(tiny_train.num_clients):
        n = int(tiny_train.num_examples[i])
        if n == 0:
            np.testing.assert_array_equal(new.mixture[i], 0.5)
            continue
        batch = jax.tree.map(lambda a, n=n, i=i: a[i, :n], tiny_train.examples)
        losses = np.stack([np.asarray(MODEL.loss(MODEL.apply(
            jax.tree.map(lambda a, k=k: a[k], state.params), batch, None), batch), np.float64)
            for k in range(2)])
        q = np.exp(-losses) / np.exp(-losses).sum(0)  # uniform prior pi = 1/2
        np.testing.assert_allclose(new.mixture[i], q.mean(1), rtol=1e-5)
    np.testing.assert_allclose(np.asarray(new.mixture).sum(1), 1.0, rtol=1e-6)


def test_lg_fedavg_with_every_layer_global_is_fedavg(tiny_train, tiny_test):
    config = {**CONFIG, "local_epochs": 2, "clients_per_round": 5}
    algo = ALGORITHMS["lg_fedavg"](MODEL, global_layers=".", **config)
    got, got_m = run(algo, tiny_train, 3)
    fedavg = ALGORITHMS["fedavg"](MODEL, **config)
    want, want_m = run(fedavg, tiny_train, 3)
    assert got.client_local == {}
    flat = {"/".join(k.key for k in p): a
            for p, a in jax.tree_util.tree_flatten_with_path(want.params)[0]}
    testing.assert_trees_close(got.global_params, flat, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got_m["train_loss"], want_m["train_loss"], rtol=1e-5)
    testing.assert_trees_close(algo.evaluate(got, tiny_train, tiny_test),
                               fedavg.evaluate(want, tiny_train, tiny_test), rtol=1e-5, atol=1e-5)


def test_lg_fedavg_keeps_the_representation_local_and_averages_the_head(tiny_train):
    algo = ALGORITHMS["lg_fedavg"](MODEL, clients_per_round=5, local_steps=2, **CONFIG)
    assert set(algo.init(jax.random.key(0), tiny_train).global_params) == {"head/bias",
                                                                           "head/kernel"}
    state, _ = run(algo, tiny_train, 3)
    kernels = np.asarray(state.client_local["hidden_0/kernel"])
    trained = [i for i in range(tiny_train.num_clients) if not np.array_equal(kernels[i],
                                                                               kernels[3])]
    assert len(trained) >= 5  # client 3 has no data: its representation never moves
    assert len({kernels[i].tobytes() for i in trained}) == len(trained)  # each its own


@pytest.mark.slow
def test_fedbabu_is_fedavg_with_the_head_frozen_and_fine_tunes_at_evaluation(tiny_train,
                                                                            tiny_test):
    config = {**CONFIG, "local_epochs": 2, "clients_per_round": 5}
    algo = ALGORITHMS["fedbabu"](MODEL, ft_steps=0, **config)
    got, got_m = run(algo, tiny_train, 3)
    frozen = lambda lr: optax.multi_transform(
        {"train": optax.sgd(lr), "freeze": optax.set_to_zero()},
        lambda p: {k: jax.tree.map(lambda _, k=k: "freeze" if k == "head" else "train", v)
                   for k, v in p.items()})
    fedavg = ALGORITHMS["fedavg"](MODEL, client_optimizer=frozen, **config)
    want, want_m = run(fedavg, tiny_train, 3)
    init = MODEL.init(jax.random.key(0))
    testing.assert_trees_close(got.head, {"head/bias": init["head"]["bias"],
                                          "head/kernel": init["head"]["kernel"]}, rtol=0, atol=0)
    testing.assert_trees_close(got.body, {"hidden_0/bias": want.params["hidden_0"]["bias"],
                                          "hidden_0/kernel": want.params["hidden_0"]["kernel"]},
                               rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got_m["train_loss"], want_m["train_loss"], rtol=1e-5)
    # ft_steps=0: the global model as it is; fine-tuning then changes the result.
    testing.assert_trees_close(algo.evaluate(got, tiny_train, tiny_test),
                               fedavg.evaluate(want, tiny_train, tiny_test), rtol=1e-5, atol=1e-5)
    for head_only in (False, True):
        tuned = ALGORITHMS["fedbabu"](MODEL, ft_steps=5, ft_lr=0.5, ft_head_only=head_only,
                                      **config).evaluate(got, tiny_train, tiny_test)
        assert not np.allclose(tuned["loss_sum"], algo.evaluate(got, tiny_train,
                                                                tiny_test)["loss_sum"])


def test_fedrod_generic_model_is_fedavg_on_class_balanced_clients():
    """With equal class counts the balanced softmax only shifts every logit by the same
    log-count, so the body and generic head follow FedAvg; the personal heads train."""
    from fedjax_pfl.data.client_data import ClientData
    rng = np.random.default_rng(0)
    balanced = ClientData.from_clients([
        {"x": rng.normal(size=(6 * (i + 1), 6)).astype(np.float32),
         "y": np.tile(np.arange(3, dtype=np.int32), 2 * (i + 1))} for i in range(4)],
        num_classes=3)
    config = {**CONFIG, "local_epochs": 2, "clients_per_round": 3}
    algo = ALGORITHMS["fedrod"](MODEL, **config)
    got, got_m = run(algo, balanced, 3)
    want, _ = run(ALGORITHMS["fedavg"](MODEL, **config), balanced, 3)
    testing.assert_trees_close(got.params, want.params, rtol=1e-5, atol=1e-6)
    start = algo.init(jax.random.key(0), balanced).personal_head
    moved = [not np.array_equal(got.personal_head["head/kernel"][i], start["head/kernel"][i])
             for i in range(4)]
    assert sum(moved) >= 3
    assert np.isfinite(got_m["train_loss"])


@pytest.mark.slow  # the alias itself is checked cheaply in tests/core/test_config.py
@pytest.mark.parametrize("name", ["fedbabu", "fedrod"])
def test_old_head_argument_warns_and_equals_personal(name, tiny_train, tiny_test):
    with pytest.warns(DeprecationWarning, match="'head' is deprecated; pass 'personal'"):
        old = ALGORITHMS[name](MODEL, head=("hidden_0",), clients_per_round=4, **CONFIG)
    new = ALGORITHMS[name](MODEL, personal=("hidden_0",), clients_per_round=4, **CONFIG)
    got = [run(algo, tiny_train, 1)[0] for algo in (old, new)]
    testing.assert_trees_close(got[0], got[1], rtol=0, atol=0)
    testing.assert_trees_close(old.evaluate(got[0], tiny_train, tiny_test),
                               new.evaluate(got[1], tiny_train, tiny_test), rtol=0, atol=0)


def test_argument_errors_name_the_argument():
    for name, kwargs, match in [
            ("scaffold", {"weighting": "size"}, "^weighting:"),
            ("hypcluster", {"num_models": 0}, "^num_models:"),
            ("hypcluster", {"init": "random"}, "^init:"),
            ("fedem", {"num_models": 1.5}, "^num_models:"),
            ("fedem", {"server_lr": -1.0}, "^server_lr:"),
            ("lg_fedavg", {"global_layers": ("nope",)}, "^global_layers:"),
            ("lg_fedavg", {"weighting": "size"}, "^weighting:"),
            ("fedbabu", {"personal": ("nope",)}, "^personal:"),
            ("fedbabu", {"ft_steps": -1}, "^ft_local_steps:"),
            ("fedbabu", {"ft_head_only": 1}, "^ft_head_only:"),
            ("fedrod", {"personal": "nomatch$"}, "^personal:"),
            ("fedrod", {"client_lr": -0.1}, "^client_lr:")]:
        with pytest.raises(ValueError, match=match):
            ALGORITHMS[name](MODEL, **kwargs)
