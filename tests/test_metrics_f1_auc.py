"""Class-weighted F1 and macro one-vs-rest AUC against scikit-learn on random inputs."""

import jax
import numpy as np
import pytest
from sklearn.metrics import f1_score, roc_auc_score

from fedjax_pfl import metrics
from fedjax_pfl.core import evaluation, local
from fedjax_pfl.data.client_data import ClientData
from fedjax_pfl.models.model import Model, cross_entropy

C = 4
# The "model" returns the features as logits, so the scores are chosen by the test.
IDENTITY = Model(init=lambda key: {}, apply=lambda p, batch, key: batch["x"], loss=cross_entropy)


def _clients(seed):
    rng = np.random.default_rng(seed)
    clients = []
    for i, (n, classes) in enumerate([(30, C), (25, 2), (12, 3), (9, 1), (0, C), (40, C)]):
        y = rng.choice(rng.permutation(C)[:classes], size=n).astype(np.int32)
        x = rng.normal(size=(n, C)).astype(np.float32)
        if i == 5:  # coarse scores: many exact ties
            x = np.round(x).astype(np.float32)
        clients.append({"x": x, "y": y})
    return clients


@pytest.fixture(scope="module")
def stats():
    clients = _clients(0)
    data = ClientData.from_clients(clients, num_classes=C).pad_examples(48)
    per_client = jax.jit(jax.vmap(lambda d: local.evaluate_client(IDENTITY, {}, d)))(data)
    return clients, jax.device_get(per_client)


def test_f1_weighted_equals_sklearn(stats):
    clients, per_client = stats
    f1 = metrics.f1_weighted(per_client)
    for i, c in enumerate(clients):
        if len(c["y"]) == 0:
            assert f1[i] == 0.0
            continue
        want = f1_score(c["y"], np.argmax(c["x"], 1), average="weighted", zero_division=0)
        assert f1[i] == pytest.approx(want, abs=1e-6), i


def test_auc_macro_equals_sklearn(stats):
    clients, per_client = stats
    zero = metrics.auc_macro(per_client, absent="zero")
    skip = metrics.auc_macro(per_client, absent="skip")
    for i, c in enumerate(clients):
        y = c["y"]
        if len(y) == 0:
            assert zero[i] == 0.0 and np.isnan(skip[i])
            continue
        probs = np.asarray(jax.nn.softmax(c["x"], -1), np.float64)
        present = [k for k in range(C) if 0 < np.sum(y == k) < len(y)]
        per_class = {k: roc_auc_score(y == k, probs[:, k]) for k in present}
        if len(present) == C:  # sklearn's multi-class call needs every class present
            full = roc_auc_score(y, probs, multi_class="ovr", average="macro")
            assert zero[i] == pytest.approx(full, abs=1e-5), i
        assert zero[i] == pytest.approx(sum(per_class.values()) / C, abs=1e-5), i
        if present:
            assert skip[i] == pytest.approx(np.mean(list(per_class.values())), abs=1e-5), i
        else:  # one label only: AUC undefined (the FedAPM code reports 0)
            assert np.isnan(skip[i]) and zero[i] == 0.0


def test_tables_and_summaries_gain_f1_and_auc(stats):
    _, per_client = stats
    table = metrics.client_table(per_client)
    assert np.isnan(table["f1"][4]) and np.isnan(table["auc"][4])  # no test example
    summary = metrics.summarize(per_client)
    has = np.asarray(per_client["num_examples"]) > 0
    assert summary["f1_mean"] == pytest.approx(metrics.f1_weighted(per_client)[has].mean())
    assert summary["auc_mean"] == pytest.approx(metrics.auc_macro(per_client)[has].mean())
    assert summary["auc_skip_mean"] == pytest.approx(
        np.nanmean(metrics.auc_macro(per_client, absent="skip")[has]))
    # The keys that existed before are unchanged.
    base = {k: per_client[k] for k in ("num_examples", "num_correct", "loss_sum")}
    old = metrics.summarize(base)
    assert {k: summary[k] for k in old} == old


def test_bad_absent_flag():
    with pytest.raises(ValueError, match="absent"):
        metrics.auc_macro({"class_auc": np.zeros((1, 2)), "class_true": np.ones((1, 2))}, "nan")


@pytest.mark.parametrize("seed", range(4))
def test_rank_and_pairwise_auc_agree_with_sklearn(seed):
    """Large test sets (N > 128 rows) use the sort-based rank formula instead of
    all pairs; both must equal sklearn on the same float32 scores, ties and
    padding included."""
    rng = np.random.default_rng(seed)
    n = int(rng.integers(2, 150))
    scores = np.round(rng.random(n) * 8).astype(np.float32) / 8  # many exact ties
    positive = rng.random(n) < 0.3
    positive[:2] = [True, False]
    want = roc_auc_score(positive, scores)
    for rows in (150, 300):
        pad = rows - n
        s = jax.numpy.asarray(np.pad(scores, (0, pad)))
        p = jax.numpy.asarray(np.pad(positive, (0, pad)))
        mask = jax.numpy.arange(rows) < n
        assert float(evaluation._ovr_auc_ranks(s, p, mask)) == pytest.approx(want, abs=1e-6)
        assert float(evaluation._ovr_auc_pairs(s, p, mask)) == pytest.approx(want, abs=1e-6)
