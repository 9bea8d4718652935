"""FedBN: the naive loop on a BatchNorm MLP, FedAvg without BatchNorm, the generic
statistics hook of the local loop, per-client evaluation and argument checks."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedjax_pfl import models, testing
from fedjax_pfl.algorithms import ALGORITHMS
from fedjax_pfl.core import params as params_lib
from fedjax_pfl.testing import naive_fedbn

BN_MODEL = models.mlp_bn((6,), 3, hidden=(8,))
MODEL = models.mlp((6,), 3, hidden=(8,))
CONFIG = {"batch_size": 4, "client_lr": 0.1}
# Every client with data has n >= 8 and n % 4 != 1: no batch of a single row, whose
# variance 0 makes the normalized values rounding noise / sqrt(eps) (PyTorch refuses
# such a batch in training), so that the comparison with the naive loop is well posed.
BN_TRAIN = testing.random_client_data(41, 9, empty=(3,))
BN_TEST = testing.random_client_data(41, 9, sample_seed=1, empty=(3,))


def rounds(algo, train, num, state=None):
    state = algo.init(jax.random.key(0), train) if state is None else state
    round_fn = jax.jit(algo.round)
    out = []
    for r in range(num):
        state, metrics = round_fn(state, train, jax.random.fold_in(jax.random.key(9), r))
        out.append((state, metrics))
    return out


@pytest.mark.parametrize("options", [
    {"local_epochs": 2, "clients_per_round": 4},  # partial batches, clients outside the cohort
    pytest.param({"local_steps": 3, "weighting": "uniform"}, marks=pytest.mark.slow),
], ids=["epochs", "steps"])
def test_fedbn_equals_naive_loop_on_mlp_bn(options):
    tiny_train = BN_TRAIN
    config = {**CONFIG, **options}
    algo = ALGORITHMS["fedbn"](BN_MODEL, **config)
    state = algo.init(jax.random.key(0), tiny_train)
    assert sorted(state.client_personal) == ["batch_stats/bn_0/mean", "batch_stats/bn_0/var",
                                             "params/bn_0/bias", "params/bn_0/scale"]
    want = state
    for r, (got, got_m) in enumerate(rounds(algo, tiny_train, 2)):
        want, want_m = testing.naive_round("fedbn", BN_MODEL, want, tiny_train,
                                           jax.random.fold_in(jax.random.key(9), r), **config)
        testing.assert_trees_close(got, want, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(got_m["train_loss"], want_m["train_loss"], rtol=1e-5)
    # The clients' BN parts (statistics included) diverged from their common start.
    var = np.asarray(got.client_personal["batch_stats/bn_0/var"])
    assert len(np.unique(var.round(4), axis=0)) >= 3


@pytest.mark.slow
def test_without_batch_norm_fedbn_is_fedavg(tiny_train):
    """Bit-identical op by op (eagerly); jitted, XLA may fuse the two servers' sums differently."""
    config = {**CONFIG, "local_epochs": 1, "clients_per_round": 3}
    fedbn, fedavg = ALGORITHMS["fedbn"](MODEL, **config), ALGORITHMS["fedavg"](MODEL, **config)
    for jit, num, tol in ((False, 1, 0.0), (True, 2, 1e-6)):
        g, w = fedbn.init(jax.random.key(0), tiny_train), fedavg.init(jax.random.key(0), tiny_train)
        for r in range(num):
            key = jax.random.fold_in(jax.random.key(9), r)
            g, g_m = (jax.jit(fedbn.round) if jit else fedbn.round)(g, tiny_train, key)
            w, w_m = (jax.jit(fedavg.round) if jit else fedavg.round)(w, tiny_train, key)
            assert g.client_personal == {}
            flat = {params_lib.path_name(p): a
                    for p, a in jax.tree_util.tree_flatten_with_path(w.params)[0]}
            testing.assert_trees_close(g.shared, flat, rtol=tol, atol=tol)
            np.testing.assert_allclose(g_m["train_loss"], w_m["train_loss"], rtol=tol, atol=tol)


def test_fedavg_on_mlp_bn_moves_the_running_statistics(tiny_train):
    """The default local loop updates BatchNorm statistics for every algorithm using it."""
    algo = ALGORITHMS["fedavg"](BN_MODEL, **CONFIG, local_steps=2)
    init = algo.init(jax.random.key(0), tiny_train).params["batch_stats"]["bn_0"]
    (state, metrics), = rounds(algo, tiny_train, 1)
    stats = state.params["batch_stats"]["bn_0"]
    assert np.abs(np.asarray(stats["mean"]) - np.asarray(init["mean"])).max() > 1e-3
    assert np.abs(np.asarray(stats["var"]) - np.asarray(init["var"])).max() > 1e-3
    assert np.isfinite(float(metrics["train_loss"]))


def test_evaluation_uses_each_clients_own_statistics():
    tiny_train, tiny_test = BN_TRAIN, BN_TEST
    algo = ALGORITHMS["fedbn"](BN_MODEL, **CONFIG, local_steps=2)
    (state, _), = rounds(algo, tiny_train, 1)
    got = jax.jit(algo.evaluate)(state, tiny_train, tiny_test)
    params = {"params": {}, "batch_stats": {}}
    for path, leaf in state.shared.items():
        kind, module, name = path.split("/")
        params[kind].setdefault(module, {})[name] = np.asarray(leaf)
    x, y = np.asarray(tiny_test.examples["x"]), np.asarray(tiny_test.examples["y"])
    for i in range(tiny_test.num_clients):
        p = {k: {m: dict(d) for m, d in v.items()} for k, v in params.items()}
        for path, leaf in state.client_personal.items():
            kind, module, name = path.split("/")
            p[kind].setdefault(module, {})[name] = np.asarray(leaf[i])
        n = int(tiny_test.num_examples[i])
        if n == 0:
            continue
        logits, _ = naive_fedbn.mlp_bn_forward(p["params"], p["batch_stats"], x[i, :n], False)
        correct = np.sum(np.argmax(np.asarray(logits), 1) == y[i, :n])
        assert float(got["num_correct"][i]) == correct, i
    # Another client's statistics give other logits.
    swapped = state.replace(client_personal={k: jnp.roll(v, 1, axis=0)
                                             for k, v in state.client_personal.items()})
    other = jax.jit(algo.evaluate)(swapped, tiny_train, tiny_test)
    assert not np.allclose(np.asarray(other["loss_sum"]), np.asarray(got["loss_sum"]))


@pytest.mark.parametrize("personal, match", [
    ("(", "not a valid regular expression"), (("nope",), "matches no parameter"),
    (".", "matches every parameter"), (3, "expected a non-empty sequence")])
def test_bad_personal_label_is_rejected(personal, match):
    with pytest.raises(ValueError, match=f"^personal: .*{match}"):
        ALGORITHMS["fedbn"](BN_MODEL, personal=personal)


def test_an_explicit_label_selects_the_personal_part(tiny_train):
    algo = ALGORITHMS["fedbn"](BN_MODEL, **CONFIG, personal=("batch_stats",))
    state = algo.init(jax.random.key(0), tiny_train)
    assert sorted(state.client_personal) == ["batch_stats/bn_0/mean", "batch_stats/bn_0/var"]
