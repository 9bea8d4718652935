"""The documentation: its links resolve, and the worked example of docs/architecture.md is
the code in docs/examples/, which runs and is right."""

import importlib.util
import pathlib
import re
import sys

import numpy as np
import pytest

import fedjax_pfl as fp
from fedjax_pfl import testing

ROOT = pathlib.Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "docs" / "examples" / "fedavg_decay.py"
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
MODEL = fp.models.mlp((6,), 3, hidden=(8,))
CONFIG = {"batch_size": 4, "local_steps": 3, "client_lr": 0.1}


@pytest.fixture(scope="module")
def example():
    spec = importlib.util.spec_from_file_location("fedavg_decay_example", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while building
    spec.loader.exec_module(module)
    return module


def run(algo, train, test, **kwargs):
    return fp.simulate(algo, train, test, rounds=3, seed=3, progress=False, **kwargs)


def test_example_with_decay_one_is_fedavg(example, tiny_train, tiny_test, monkeypatch):
    monkeypatch.setitem(fp.ALGORITHMS, "fedavg_decay", example.fedavg_decay)  # undone after
    algo = fp.ALGORITHMS["fedavg_decay"](MODEL, clients_per_round=4, decay=1.0, **CONFIG)
    got = run(algo, tiny_train, tiny_test)
    want = run(fp.algorithms.fedavg(MODEL, clients_per_round=4, **CONFIG), tiny_train, tiny_test)
    testing.assert_trees_close(got.state.params, want.state.params, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose([h["train_loss"] for h in got.history],
                               [h["train_loss"] for h in want.history], rtol=1e-6)
    counts = np.asarray(got.state.participations)
    assert counts.sum() == 3 * 4 and counts.max() <= 3  # 3 rounds of 4 clients, each once a round


@pytest.mark.slow
def test_example_decay_is_traced_and_applied(example, tiny_train, tiny_test):
    # decay = 1 and 0 in one vmapped compile (full participation): decay 1 is FedAvg;
    # decay 0 trains in round 1 only, so its evaluations after rounds 1, 2, 3 are equal.
    algo = example.fedavg_decay(MODEL, decay=0.5, **CONFIG)
    one, zero = fp.simulate_grid(algo, tiny_train, tiny_test, seeds=[3, 3], rounds=3,
                                 eval_every=1, hparams={"decay": [1.0, 0.0]}, progress=False)
    fedavg = run(fp.algorithms.fedavg(MODEL, **CONFIG), tiny_train, tiny_test, eval_every=1)
    testing.assert_trees_close(one.state.params, fedavg.state.params, rtol=1e-5, atol=1e-6)
    tables = [table["loss"] for _, table in zero.client_history]  # rounds 0, 1, 2, 3
    assert not np.allclose(tables[0], tables[1], equal_nan=True)
    np.testing.assert_array_equal(tables[1], tables[3])
    np.testing.assert_array_equal(zero.state.participations, np.full(tiny_train.num_clients, 3))


def test_example_main_runs(example, monkeypatch, capsys):
    monkeypatch.setitem(fp.ALGORITHMS, "fedavg_decay", example.fedavg_decay)  # main registers it
    example.main(rounds=2)
    assert "acc_weighted" in capsys.readouterr().out


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_relative_links_point_into_the_repository(page):
    text = page.read_text(encoding="utf-8")
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"[a-z]+:", target) or target.startswith("#"):
            continue
        path = (page.parent / target.split("#")[0]).resolve()
        assert path.is_relative_to(ROOT) and path.exists(), f"{page.name}: broken link {target}"


def test_code_quoted_in_the_architecture_page_is_the_example_file():
    text = (ROOT / "docs" / "architecture.md").read_text(encoding="utf-8")
    blocks = re.findall(r"<!-- from docs/examples/fedavg_decay.py -->\n```python\n(.*?)```",
                        text, re.S)
    assert len(blocks) >= 6
    source = EXAMPLE.read_text(encoding="utf-8")
    for block in blocks:
        assert block in source, f"docs/architecture.md quotes code not in {EXAMPLE.name}:\n{block}"
