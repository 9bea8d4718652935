"""The driver: blocks of rounds, evaluation, divergence, resume, results."""

import json

import numpy as np
import pytest

from fedjax_pfl import models, simulate, testing
from fedjax_pfl.algorithms import fedavg, local_only
from fedjax_pfl.simulate import TrainingDiverged

MODEL = models.mlp((6,), 3, hidden=(8,))


@pytest.fixture(scope="module")
def algo():
    return fedavg(MODEL, clients_per_round=4, batch_size=4, local_steps=3, client_lr=0.2)


def test_history_evaluations_and_learning(algo, tiny_train, tiny_test):
    result = simulate(algo, tiny_train, tiny_test, rounds=12, eval_every=4, progress=False)
    assert [h["round"] for h in result.history] == list(range(1, 13))
    assert [e["round"] for e in result.evals] == [0, 4, 8, 12]
    assert result.evals[-1]["loss_weighted"] < result.evals[0]["loss_weighted"]
    assert int(result.state.round) == 12
    assert result.client_metrics["accuracy"].shape == (11,)
    frame = result.to_dataframe()
    assert len(frame) == 13 and {"train_loss", "acc_weighted", "acc_mean"} <= set(frame.columns)
    final = result.final()
    assert final["best_acc_weighted"] >= final["acc_weighted"]
    assert json.loads(result.to_json())["final"]["round"] == 12


def test_block_size_and_resume_do_not_change_results(algo, tiny_train, tiny_test):
    one = simulate(algo, tiny_train, tiny_test, rounds=6, eval_every=None, progress=False)
    blocks = simulate(algo, tiny_train, tiny_test, rounds=6, eval_every=4, progress=False)
    half = simulate(algo, tiny_train, tiny_test, rounds=3, progress=False)
    resumed = simulate(algo, tiny_train, tiny_test, rounds=3, state=half.state, progress=False)
    testing.assert_trees_close(one.state, blocks.state, rtol=1e-6, atol=1e-6)
    testing.assert_trees_close(one.state, resumed.state, rtol=1e-6, atol=1e-6)
    assert int(half.state.round) == 3  # the caller's state survives the donation


def test_same_seed_same_result_other_seed_differs(tiny_train, tiny_test):
    algo = local_only(MODEL, clients_per_round=4, batch_size=4, local_steps=2)
    a = simulate(algo, tiny_train, tiny_test, rounds=3, seed=5, progress=False)
    b = simulate(algo, tiny_train, tiny_test, rounds=3, seed=5, progress=False)
    c = simulate(algo, tiny_train, tiny_test, rounds=3, seed=6, progress=False)
    assert a.history == b.history and a.evals == b.evals
    assert a.history != c.history


def test_nan_loss_stops_the_run_naming_the_round(tiny_train, tiny_test):
    algo = fedavg(MODEL, batch_size=4, local_steps=5, client_lr=1e9)
    with pytest.raises(TrainingDiverged, match=r"at round \d+") as info:
        simulate(algo, tiny_train, tiny_test, rounds=20, eval_every=5, progress=False)
    assert info.value.result.history  # the partial run is kept


def test_save_writes_the_results_directory(algo, tiny_train, tiny_test, tmp_path):
    result = simulate(algo, tiny_train, tiny_test, rounds=2, progress=False)
    result.save(str(tmp_path), config={"algorithm": "fedavg"})
    for name in ("config.json", "rounds.jsonl", "evals.jsonl", "clients.csv", "summary.json"):
        assert (tmp_path / name).exists(), name
    assert len((tmp_path / "rounds.jsonl").read_text().splitlines()) == 2


@pytest.mark.parametrize("kwargs,error,match", [
    ({"rounds": -1}, ValueError, "rounds"),
    ({"rounds": 2, "eval_every": 0}, ValueError, "eval_every"),
    ({"rounds": 2, "seed": 1.5}, ValueError, "seed"),
])
def test_bad_arguments(algo, tiny_train, tiny_test, kwargs, error, match):
    with pytest.raises(error, match=match):
        simulate(algo, tiny_train, tiny_test, progress=False, **kwargs)


def test_mismatched_test_clients_and_wrong_algorithm(algo, tiny_train, tiny_test):
    with pytest.raises(ValueError, match="test: expected 11 clients"):
        simulate(algo, tiny_train, tiny_test.take(np.arange(5)), rounds=1, progress=False)
    with pytest.raises(TypeError, match="algorithm"):
        simulate(lambda x: x, tiny_train, tiny_test, rounds=1, progress=False)
