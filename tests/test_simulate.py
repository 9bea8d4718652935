"""The driver: blocks of rounds, evaluation, divergence, resume, results."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fedjax_pfl as fp
from fedjax_pfl import models, simulate, testing
from fedjax_pfl.algorithms import fedavg, local_only
from fedjax_pfl.simulate import TrainingDiverged

MODEL = models.mlp((6,), 3, hidden=(8,))
ROOT = Path(__file__).resolve().parents[1]


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


def test_nan_loss_stops_the_run_naming_the_round_and_keeps_the_last_finite_state(
        tiny_train, tiny_test):
    algo = fedavg(MODEL, batch_size=4, local_steps=5, client_lr=1e9)
    with pytest.raises(TrainingDiverged, match=r"^round 1: the training loss became nan") as info:
        simulate(algo, tiny_train, tiny_test, rounds=20, progress=False)  # a single block
    result = info.value.result
    assert int(result.state.round) == 0 and [h["round"] for h in result.history] == [1]
    assert all(np.all(np.isfinite(np.asarray(a))) for a in jax.tree.leaves(result.state))


def test_divergence_mid_block_names_that_round_keeps_checkpoints(tiny_train, tiny_test, tmp_path):
    """A loss above max_loss_ratio x the first round's counts as diverged; the state is the one
    before that round, the rounds file has every round up to it and older checkpoints stay."""
    base = fedavg(MODEL, batch_size=4, local_steps=3, client_lr=0.2)

    def round_fn(state, train, key):  # FedAvg reporting a loss of 10**r at 0-based round r
        new, _ = base.round(state, train, key)
        return new, {"train_loss": 10.0 ** state.round.astype(jnp.float32)}

    algo = fp.FederatedAlgorithm(base.init, round_fn, base.evaluate)
    out = tmp_path / "out"
    with pytest.raises(TrainingDiverged, match=r"^round 3: the training loss 100 exceeded") as info:
        simulate(algo, tiny_train, tiny_test, rounds=12, eval_every=6, checkpoint_every=1,
                 out=str(out), progress=False, max_loss_ratio=50.0)
    result = info.value.result
    assert int(result.state.round) == 2
    testing.assert_trees_close(result.state.params, _params_after(base, tiny_train, tiny_test, 2),
                               rtol=0, atol=0)
    rows = [json.loads(line) for line in (out / "rounds.jsonl").read_text().splitlines()]
    assert [r["train_loss"] for r in rows] == [1.0, 10.0, 100.0]
    assert json.loads((out / "summary.json").read_text())["status"] == "diverged"
    assert {"1", "2"} <= set(os.listdir(out / "checkpoints"))
    assert "3" not in os.listdir(out / "checkpoints")


def _params_after(algo, train, test, rounds):
    return simulate(algo, train, test, rounds=rounds, progress=False).state.params


def test_nonfinite_values_are_written_as_null_with_a_flag(tiny_train, tiny_test, tmp_path):
    algo = fedavg(MODEL, batch_size=4, local_steps=5, client_lr=1e9)
    with pytest.raises(TrainingDiverged, match="Results so far"):
        simulate(algo, tiny_train, tiny_test, rounds=3, out=str(tmp_path), progress=False)
    (row,) = [json.loads(line) for line in (tmp_path / "rounds.jsonl").read_text().splitlines()]
    assert row == {"round": 1, "train_loss": None, "nonfinite": ["train_loss"]}


def test_output_directory_is_refused_overwritten_or_resumed(algo, tiny_train, tiny_test, tmp_path):
    out = tmp_path / "out"
    simulate(algo, tiny_train, tiny_test, rounds=2, out=str(out), progress=False)
    with pytest.raises(ValueError, match="out: .* exists and is not empty"):
        simulate(algo, tiny_train, tiny_test, rounds=2, out=str(out), progress=False)
    (out / "mine.txt").write_text("kept")
    simulate(algo, tiny_train, tiny_test, rounds=1, out=str(out), overwrite=True, progress=False)
    assert len((out / "rounds.jsonl").read_text().splitlines()) == 1
    assert (out / "mine.txt").read_text() == "kept"  # only the run's own files are replaced
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises((OSError, ValueError), match="out:"):
        simulate(algo, tiny_train, tiny_test, rounds=1, out=str(blocker / "sub"), progress=False)


def test_checkpoint_of_another_run_or_corrupt_is_a_one_line_error(algo, tiny_train, tiny_test,
                                                                  tmp_path):
    out = tmp_path / "out"
    simulate(algo, tiny_train, tiny_test, rounds=2, out=str(out), checkpoint_every=1,
             progress=False)
    other = local_only(MODEL, batch_size=4, local_steps=3)
    with pytest.raises(ValueError, match=r"checkpoint: .*checkpoints/2' was made by another run"):
        simulate(other, tiny_train, tiny_test, rounds=3, out=str(out), resume=True,
                 progress=False)
    fewer = tiny_train.take(np.arange(6)), tiny_test.take(np.arange(6))
    with pytest.raises(ValueError, match="train: the checkpoints .* another run with 11 clients"):
        simulate(algo, *fewer, rounds=3, out=str(out), resume=True, progress=False)
    with pytest.raises(ValueError, match="seed: the checkpoints"):
        simulate(algo, tiny_train, tiny_test, rounds=3, out=str(out), resume=True, seed=3,
                 progress=False)
    for path in (out / "checkpoints" / "2").rglob("*"):
        if path.is_file():
            path.write_bytes(b"garbage")
    with pytest.raises(ValueError, match=r"checkpoint: cannot read .*checkpoints/2'"):
        simulate(algo, tiny_train, tiny_test, rounds=3, out=str(out), resume=True,
                 progress=False)


def test_callbacks_and_tensorboard_events(algo, tiny_train, tiny_test, tmp_path):
    from tensorboardX.proto import event_pb2

    seen = []

    class Recorder:
        def on_block(self, result, rows, state):
            seen.append(("block", [r["round"] for r in rows]))

        def on_evaluation(self, result, summary, table, state):
            seen.append(("eval", summary["round"], table["accuracy"].shape))

        def on_end(self, result):
            seen.append(("end", int(result.state.round)))

    board = fp.callbacks.TensorBoard(str(tmp_path / "tb"))
    simulate(algo, tiny_train, tiny_test, rounds=4, eval_every=2, progress=False,
             callbacks=[Recorder(), board])
    assert seen == [("eval", 0, (11,)), ("block", [1, 2]), ("eval", 2, (11,)),
                    ("block", [3, 4]), ("eval", 4, (11,)), ("end", 4)]
    (events,) = list((tmp_path / "tb").iterdir())
    data, tags = events.read_bytes(), {}
    while data:  # TFRecord: u64 length, u32 crc, payload, u32 crc
        length = int.from_bytes(data[:8], "little")
        event = event_pb2.Event.FromString(data[12:12 + length])
        for value in event.summary.value:
            tags.setdefault(value.tag, []).append(event.step)
        data = data[16 + length:]
    assert tags["train/train_loss"] == [1, 2, 3, 4]
    assert tags["eval/acc_weighted"] == [0, 2, 4]


@pytest.mark.slow  # fast-tier budget: runs in the slow tier (CI runs both)
def test_killed_run_resumed_is_bit_identical(tmp_path):
    """A real subprocess, killed with SIGKILL after its first checkpoints, then resumed with
    `fedjax-pfl run --resume`, ends with the same files and parameters as an uninterrupted run."""
    flags = ["run", "--clients", "10", "--rounds", "600", "--eval-every", "20",
             "--checkpoint-every", "20", "--quiet", "--set", "local_steps=20",
             "--set", "batch_size=16"]

    def start(*args):
        code = "import sys; from fedjax_pfl.cli import main; sys.exit(main(sys.argv[1:]))"
        return subprocess.Popen([sys.executable, "-c", code, *args], cwd=tmp_path,
                                env={**os.environ, "PYTHONPATH": str(ROOT)},
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)

    killed = start(*flags, "--out", "killed")
    deadline = time.time() + 300
    while not (tmp_path / "killed" / "checkpoints" / "60").exists():
        assert killed.poll() is None and time.time() < deadline, killed.stderr.read()
        time.sleep(0.01)
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    assert not (tmp_path / "killed" / "summary.json").exists(), "the run ended before the kill"
    done = sorted(int(p.name) for p in (tmp_path / "killed" / "checkpoints").iterdir()
                  if p.name.isdigit())
    assert 60 <= done[-1] < 600
    for proc in (start("run", "--resume", "killed", "--quiet"), start(*flags, "--out", "whole")):
        assert proc.wait(timeout=300) == 0, proc.stderr.read()
    for name in ("rounds.jsonl", "evals.jsonl", "clients.csv"):
        assert (tmp_path / "killed" / name).read_bytes() == (tmp_path / "whole" / name).read_bytes()
    rounds = (tmp_path / "whole" / "rounds.jsonl").read_text().splitlines()
    assert len(rounds) == 600
    import orbax.checkpoint as ocp

    from fedjax_pfl.checkpoint import Checkpoints

    args = ocp.args.Composite(state=ocp.args.StandardRestore())
    states = [Checkpoints(str(tmp_path / d / "checkpoints")).manager.restore(600, args=args)
              ["state"] for d in ("killed", "whole")]
    for a, b in zip(jax.tree.leaves(states[0]), jax.tree.leaves(states[1])):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


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
