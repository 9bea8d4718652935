"""Benchmark models (FEMNIST CNN, char LSTM, text LSTM, ResNet) and per-token evaluation."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import fedjax_pfl as fp
from fedjax_pfl import metrics, models, validation
from fedjax_pfl.algorithms.fedavg import fedavg
from fedjax_pfl.core import local
from fedjax_pfl.data.client_data import ClientData

TINY = {
    "femnist_cnn": ((12, 12, 1), 62, dict(channels=(4, 8), hidden=16)),
    "char_lstm": ((6,), 10, dict(embed_dim=4, hidden=8)),
    "text_lstm": ((6,), 3, dict(vocab_size=20, embed_dim=6, hidden=8)),
    "resnet": ((8, 8, 3), 10, dict(widths=(4, 8), blocks=(1, 1), groups=2)),
}


def _batch(name, shape, classes, n=6, seed=0, **options):
    rng = np.random.default_rng(seed)
    if name in ("char_lstm", "text_lstm"):
        vocab = options.get("vocab_size", classes)
        x = rng.integers(1, vocab, size=(n, *shape)).astype(np.int32)
        if name == "text_lstm":
            x[:, shape[0] // 2:] = 0  # right padding
    else:
        x = rng.normal(size=(n, *shape)).astype(np.float32)
    if options.get("per_token"):
        y = rng.integers(1, classes, size=(n, *shape)).astype(np.int32)
        y[:, -3:] = 0  # padded tokens
    else:
        y = rng.integers(0, classes, size=(n,)).astype(np.int32)
    return {"x": jnp.asarray(x), "y": jnp.asarray(y)}


def _adam_losses(model, params, batch, steps=10, lr=0.05):
    """Losses of `steps` full-batch Adam steps (one compiled scan)."""
    opt = optax.adam(lr)

    def step(carry, _):
        p, s = carry
        loss, g = jax.value_and_grad(
            lambda q: jnp.mean(models.per_example_loss(model, q, batch)))(p)
        u, s = opt.update(g, s, p)
        return (optax.apply_updates(p, u), s), loss

    _, losses = jax.jit(lambda p: jax.lax.scan(step, (p, opt.init(p)), length=steps))(params)
    return np.asarray(losses)


@pytest.mark.parametrize("name,extra", [  # the conv nets' compiles go to the slow tier
    pytest.param("femnist_cnn", {}, marks=pytest.mark.slow), ("char_lstm", {}),
    ("char_lstm", {"per_token": True}), ("text_lstm", {}), ("text_lstm", {"bag_of_words": True}),
    pytest.param("resnet", {}, marks=pytest.mark.slow),
])
def test_shapes_and_training_reduces_loss(name, extra):
    shape, classes, options = TINY[name]
    options = {**options, **extra}
    model = models.MODELS[name](shape, classes, **options)
    params = jax.jit(model.init)(jax.random.key(0))
    assert "head" in params
    batch = _batch(name, shape, classes, **options)
    logits = jax.eval_shape(model.apply, params, batch, None)
    expected = (6, shape[0], classes) if options.get("per_token") else (6, classes)
    assert logits.shape == expected
    assert jax.eval_shape(model.loss, logits, batch).shape == (6,)
    losses = _adam_losses(model, params, batch)
    assert np.all(np.isfinite(losses)) and losses[-1] < 0.8 * losses[0], losses


def test_default_sizes_follow_leaf():
    def count(model):
        return models.num_params(jax.eval_shape(model.init, jax.random.key(0)))

    cnn = models.MODELS["femnist_cnn"]((28, 28, 1), 62)
    assert count(cnn) == 6_603_710  # LEAF's FEMNIST CNN (6.6M)
    assert count(models.femnist_cnn((784,), 62)) == 6_603_710  # LEAF's flat rows
    params = jax.eval_shape(cnn.init, jax.random.key(0))
    assert params["hidden_0"]["kernel"].shape == (7 * 7 * 64, 2048)
    lstm = jax.eval_shape(models.char_lstm((80,), 80).init, jax.random.key(0))
    assert lstm["encoder"]["embed"]["embedding"].shape == (80, 8)
    assert models.num_params(lstm) == 817_872  # LEAF's Shakespeare LSTM (0.82M)
    assert count(models.resnet((32, 32, 3), 10)) == 78_042


def test_text_lstm_ignores_padding():
    model = models.text_lstm((6,), 2, vocab_size=9, embed_dim=3, hidden=4, bag_of_words=True)
    params = model.init(jax.random.key(1))
    a = {"x": jnp.array([[3, 4, 0, 0, 0, 0]], jnp.int32)}
    b = {"x": jnp.array([[3, 4]], jnp.int32)}
    np.testing.assert_allclose(model.apply(params, a, None), model.apply(params, b, None),
                               rtol=1e-6)


def test_per_token_loss_and_accuracy_mask_padding():
    # An identity "model" whose logits are given: hand-checkable token accuracy.
    model = models.char_lstm((3,), 4, embed_dim=2, hidden=2, per_token=True)
    ident = model._replace(init=lambda key: {}, apply=lambda p, batch, key: batch["logits"])
    y = np.array([[1, 2, 0], [3, 0, 0], [2, 2, 2]], np.int32)  # 0 = pad; row 2 is padding
    pred = np.array([[1, 3, 1], [3, 1, 1], [2, 2, 2]])
    logits = 5.0 * jax.nn.one_hot(pred, 4)
    data = ClientData({"x": jnp.zeros((1, 3, 3), jnp.int32), "y": jnp.asarray(y)[None],
                       "logits": logits[None]}, jnp.array([2], jnp.int32))
    row = jax.tree.map(lambda a: a[0], data)
    stats = jax.jit(lambda r: local.evaluate_client(ident, {}, r))(row)
    # Real tokens: (1->1 ok), (2->3 wrong), (3->3 ok); padded tokens and row 2 do not count.
    assert float(stats["num_tokens"]) == 3 and float(stats["num_correct_tokens"]) == 2
    assert float(stats["num_examples"]) == 2
    np.testing.assert_allclose(float(stats["num_correct"]), 2 * 2 / 3, rtol=1e-6)
    per_token = optax.softmax_cross_entropy_with_integer_labels(logits, jnp.asarray(y))
    expected = (per_token[0, 0] + per_token[0, 1]) / 2 + per_token[1, 0]
    np.testing.assert_allclose(float(stats["loss_sum"]), float(expected), rtol=1e-5)
    assert float(stats["class_true"].sum()) == 3 and float(stats["class_tp"].sum()) == 2
    summary = metrics.summarize(jax.tree.map(lambda a: a[None], stats))
    np.testing.assert_allclose(summary["acc_weighted"], 2 / 3, rtol=1e-6)
    np.testing.assert_allclose(summary["acc_token_weighted"], 2 / 3, rtol=1e-6)


def test_per_token_summary_weights_tokens():
    stats = {"num_examples": np.array([2.0, 1.0]), "num_correct": np.array([2.0, 0.5]),
             "loss_sum": np.array([1.0, 1.0]), "num_tokens": np.array([10.0, 30.0]),
             "num_correct_tokens": np.array([10.0, 15.0])}
    out = metrics.summarize(stats)
    np.testing.assert_allclose(out["acc_mean"], 0.75)
    np.testing.assert_allclose(out["acc_token_weighted"], 25 / 40)
    assert "acc_token_weighted" not in metrics.summarize(
        {k: stats[k] for k in ("num_examples", "num_correct", "loss_sum")})


def _sequence_clients(num_clients=3, t=8, vocab=6, seed=0):
    """Each client's text repeats a client-specific cycle, right-padded with 0."""
    rng = np.random.default_rng(seed)
    clients = []
    for i in range(num_clients):
        n = int(rng.integers(3, 7))
        xs, ys = [], []
        for _ in range(n):
            length = int(rng.integers(4, t + 1))
            start = int(rng.integers(1, vocab))
            seq = [(start + j * (i + 1) - 1) % (vocab - 1) + 1 for j in range(length + 1)]
            x = np.zeros(t, np.int32)
            y = np.zeros(t, np.int32)
            x[:length], y[:length] = seq[:-1], seq[1:]
            xs.append(x)
            ys.append(y)
        clients.append({"x": np.stack(xs), "y": np.stack(ys)})
    return ClientData.from_clients(clients, num_classes=vocab)


@pytest.mark.slow
def test_sequence_model_through_simulate(tmp_path):
    train, test = _sequence_clients(seed=0), _sequence_clients(seed=1)
    model = models.char_lstm((8,), 6, embed_dim=4, hidden=16, num_layers=1, per_token=True)
    assert validation.check_data(model, train) == 6
    algo = fedavg(model, batch_size=4, local_steps=5, client_optimizer="adam", client_lr=0.05)
    result = fp.simulate(algo, train, test, rounds=2, eval_every=2, progress=False)
    first, last = result.evals[0], result.evals[-1]
    assert 0.0 <= last["acc_token_weighted"] <= 1.0 and 0.0 <= last["acc_weighted"] <= 1.0
    assert last["loss_weighted"] < first["loss_weighted"]


def test_sequence_labels_are_validated():
    model = models.char_lstm((8,), 6, embed_dim=4, hidden=8, per_token=True)
    bad = _sequence_clients()
    y = np.asarray(bad.examples["y"]).copy()
    y[0, 0, 0] = 6
    bad = ClientData({**bad.examples, "y": jnp.asarray(y)}, bad.num_examples)
    with pytest.raises(ValueError, match=r"labels in \[0, 6\)"):
        validation.check_data(model, bad)


@pytest.mark.parametrize("call,match", [
    (lambda: models.femnist_cnn((28, 28), 62), "input_shape"),
    (lambda: models.femnist_cnn((783,), 62), "input_shape"),
    (lambda: models.char_lstm((80, 1), 80), "input_shape"),
    (lambda: models.char_lstm((80,), 80, hidden=0), "hidden"),
    (lambda: models.char_lstm((80,), 80, per_token=True, pad_id=80), "pad_id"),
    (lambda: models.text_lstm((9,), 2, pad_id=-1), "pad_id"),
    (lambda: models.resnet((32, 32, 3), 10, widths=(4, 8), blocks=(1,)), "blocks"),
    (lambda: models.resnet((32, 32, 3), 1), "num_classes"),
])
def test_bad_arguments(call, match):
    with pytest.raises(ValueError, match=match):
        call()
