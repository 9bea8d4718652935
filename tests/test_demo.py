"""Tests of `fedjax_pfl.demo` (the CLI side is in test_cli.py)."""

import math
import sys

import numpy as np
import pytest

from fedjax_pfl import demo
from fedjax_pfl.data import partition
from fedjax_pfl.data.datasets import load_digits


def test_latent_clusters_relabels_each_group_by_its_own_permutation():
    train, test, group = demo.latent_clusters(num_clients=6, groups=3, seed=0)
    np.testing.assert_array_equal(group, [0, 1, 2, 0, 1, 2])
    x, y = load_digits()
    parts = partition.train_test_split(partition.iid(y, 6, seed=0), seed=1)
    pairs = {g: set() for g in range(3)}  # (true label, client label) per group
    for data, indices in zip((train, test), parts):
        for c, idx in enumerate(indices):
            n = int(data.num_examples[c])
            assert n == len(idx)
            np.testing.assert_array_equal(np.asarray(data.examples["x"][c][:n]), x[idx])
            pairs[group[c]] |= set(zip(y[idx].tolist(), np.asarray(data.examples["y"][c][:n])
                                       .tolist()))
    perms = []
    for g in range(3):
        mapping = dict(pairs[g])
        assert len(mapping) == len(pairs[g]) == 10  # a function of the true label, on 10 classes
        assert sorted(mapping.values()) == list(range(10))  # a permutation
        perms.append([mapping[k] for k in range(10)])
    assert perms[0] == list(range(10))
    assert perms[1] != perms[0] and perms[2] != perms[0] and perms[1] != perms[2]


def test_unknown_scenario_is_an_error():
    with pytest.raises(ValueError, match="unknown demo scenario"):
        demo.scenario("nope")


@pytest.mark.slow
def test_demo_trains_every_method(tmp_path):
    rows, results = demo.run(rounds=2, eval_every=1, out=str(tmp_path), echo=lambda _: None)
    assert [(r["scenario"], r["method"]) for r in rows] == [
        (s, m) for s in demo.SCENARIOS for m in results[s]]
    assert len(rows) == 9
    for runs in results.values():
        for result in runs.values():
            assert [e["round"] for e in result.evals] == [0, 1, 2]
            assert all(math.isfinite(h["train_loss"]) for h in result.history)
    assert all(0 <= r["acc_min"] <= r["acc_mean"] <= 1 for r in rows)
    demo.plot(results, str(tmp_path / "demo.png"))
    assert (tmp_path / "demo.png").stat().st_size > 0


def test_plot_without_matplotlib_names_the_extra(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)  # import raises ImportError
    with pytest.raises(ImportError, match=r"fedjax_pfl\[plot\]"):
        demo.plot({}, str(tmp_path / "demo.png"))
    assert not (tmp_path / "demo.png").exists()
