"""Host-side summaries of per-client statistics."""

import numpy as np
import pytest

from fedjax_pfl import metrics


def test_summarize_by_hand():
    per_client = {"num_examples": [10, 30, 0, 20], "num_correct": [5, 27, 0, 20],
                  "loss_sum": [10.0, 3.0, 0.0, 2.0]}
    s = metrics.summarize(per_client)
    accs = np.array([0.5, 0.9, 1.0])  # the empty client is excluded
    assert s["acc_weighted"] == pytest.approx(52 / 60)
    assert s["acc_mean"] == pytest.approx(accs.mean())
    assert s["acc_std"] == pytest.approx(accs.std())
    assert s["acc_min"] == 0.5 and s["num_clients"] == 3
    assert s["acc_p50"] == pytest.approx(0.9)
    assert s["acc_p10"] == pytest.approx(0.5 + 0.2 * 0.4)
    assert s["acc_jain"] == pytest.approx(accs.sum() ** 2 / (3 * (accs**2).sum()))
    assert s["loss_weighted"] == pytest.approx(15 / 60)
    assert s["loss_mean"] == pytest.approx(np.mean([1.0, 0.1, 0.1]))
    table = metrics.client_table(per_client)
    assert np.isnan(table["accuracy"][2])


def test_jain_index_bounds():
    assert metrics.jain_index(np.ones(5)) == pytest.approx(1.0)
    assert metrics.jain_index(np.array([1.0, 0, 0, 0])) == pytest.approx(0.25)


def test_no_test_examples_is_an_error():
    with pytest.raises(ValueError, match="no client has a test example"):
        metrics.summarize({"num_examples": [0, 0], "num_correct": [0, 0], "loss_sum": [0, 0]})
