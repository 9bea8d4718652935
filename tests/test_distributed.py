"""The client axis placed on the mesh once, and runs over several JAX processes."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

import fedjax_pfl as fp
from fedjax_pfl import cli, distributed, testing
from fedjax_pfl.simulate import _compiled

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--dataset", "synthetic", "--clients", "8", "--model", "logreg", "--rounds", "3",
        "--eval-every", "1", "--quiet", "--seed", "3", "--set", "clients_per_round=4",
        "--set", "local_steps=2"]


@pytest.mark.parametrize("flags, message", [
    (["--process-id", "1"], "--process-id: needs --num-processes"),
    (["--coordinator", "localhost:1234"], "--coordinator: needs --num-processes"),
    (["--num-processes", "2"], "--process-id: expected this process's index in [0, 2)"),
    (["--num-processes", "0", "--process-id", "0"], "--num-processes: expected an int >= 1"),
    (["--num-processes", "2", "--process-id", "2", "--coordinator", "h:1"],
     "--process-id: expected an int in [0, 2), got 2"),
    (["--num-processes", "2", "--process-id", "0"], "--coordinator: expected HOST:PORT"),
    (["--num-processes", "2", "--process-id", "0", "--coordinator", "h:1"],
     "--execution: several processes"),
    (["--num-processes", "2", "--process-id", "0", "--coordinator", "h:1", "--execution",
      "sharded", "--checkpoint-every", "1"], "--checkpoint-every: checkpoints are not supported"),
])
def test_process_flags_are_one_line_errors_before_anything_runs(flags, message, tmp_path, capsys):
    rc = cli.main(["run", *TINY, "--out", str(tmp_path / "out"), *flags])
    err = capsys.readouterr().err
    assert rc == 1 and err.count("\n") == 1 and message in err, err
    assert not (tmp_path / "out").exists()


def test_process_env_vars_are_checked(monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("FEDJAX_PFL_NUM_PROCESSES", "two")
    assert cli.main(["run", *TINY, "--out", str(tmp_path / "out")]) == 1
    assert "FEDJAX_PFL_NUM_PROCESSES: expected an int, got 'two'" in capsys.readouterr().err


def test_place_shards_client_leaves_and_leaves_indivisible_m_alone():
    mesh = fp.client_mesh()  # 4 host devices (conftest)
    data = testing.random_client_data(0, 12)
    tree = {"data": data, "server": np.zeros(3, np.float32), "step": 1}
    placed = distributed.place(tree, 12, mesh)
    assert placed["data"].num_examples.sharding.spec == P("clients")
    assert placed["data"].examples["x"].sharding.spec == P("clients")
    assert placed["server"].sharding.spec == P() and placed["step"] == 1
    assert distributed.place(placed, 12, mesh)["data"].num_examples is placed["data"].num_examples
    odd = testing.random_client_data(0, 11)
    assert distributed.place(odd, 11, mesh) is odd  # padding M would change the run
    assert distributed.client_block(12, mesh) == slice(0, 12)
    global_data = distributed.place_clients(data, 12, mesh)
    np.testing.assert_array_equal(global_data.examples["x"], data.examples["x"])
    assert global_data.examples["x"].sharding.spec == P("clients")
    with pytest.raises(ValueError, match="10 clients do not split evenly over the 4 devices"):
        distributed.client_block(10, mesh)


@pytest.mark.slow
def test_simulate_with_a_mesh_places_once_and_gives_identical_results():
    train = testing.random_client_data(0, 12, empty=(3,))
    test = testing.random_client_data(1, 12, empty=(3,))
    model = fp.models.MODELS["logreg"]((6,), 3)
    results = {}
    for mesh in (None, fp.client_mesh()):
        algo = fp.algorithms.ditto(model, clients_per_round=4, local_steps=2,
                                   execution="sharded")
        results[mesh is None] = fp.simulate(algo, train, test, rounds=3, eval_every=1,
                                            progress=False, mesh=mesh)
    # three blocks, one compile: the state comes back with the shardings it went in with
    assert _compiled(algo, False)[0]._cache_size() == 1
    plain, placed = results[True], results[False]
    per_client = [a for a in jax.tree.leaves(placed.state) if a.ndim and a.shape[0] == 12]
    assert per_client and all(a.sharding.spec == P("clients") for a in per_client)
    np.testing.assert_allclose([h["train_loss"] for h in placed.history],
                               [h["train_loss"] for h in plain.history], rtol=1e-6)
    np.testing.assert_allclose(placed.client_metrics["loss"], plain.client_metrics["loss"],
                               rtol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7),
                 placed.state, plain.state)


# ----------------------------------------------------------------- several processes


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env() -> dict:
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    return {**os.environ, "PYTHONPATH": path, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""}


def _launch(argvs: list[list[str]], cwd) -> list[subprocess.CompletedProcess]:
    """Runs the command lines at once; all must exit 0 within the time limit."""
    procs = [subprocess.Popen(a, cwd=cwd, env=_env(), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for a in argvs]
    try:
        outs = [p.communicate(timeout=400) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
    return outs


CLI = [sys.executable, "-c", "import sys; from fedjax_pfl.cli import main; sys.exit(main())",
       "run", "--execution", "sharded", *TINY]


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.slow
def test_cli_in_two_processes_matches_one_process(tmp_path):
    port = _free_port()
    _launch([[*CLI, "--devices", "1", "--num-processes", "2", "--process-id", str(i),
              "--coordinator", f"127.0.0.1:{port}", "--out", "two"] for i in range(2)], tmp_path)
    _launch([[*CLI, "--devices", "2", "--out", "one"]], tmp_path)
    one, two = tmp_path / "one", tmp_path / "two"
    assert (two / "summary.json").exists() and not (two / "checkpoints").exists()
    loss = lambda d: [r["train_loss"] for r in _jsonl(d / "rounds.jsonl")]
    assert len(loss(two)) == 3
    np.testing.assert_allclose(loss(two), loss(one), rtol=1e-5)
    clients = lambda d: np.genfromtxt(d / "clients.csv", delimiter=",", skip_header=1)[:, :6]
    np.testing.assert_allclose(clients(two), clients(one), rtol=1e-5, atol=1e-6)
    for a, b in zip(_jsonl(two / "evals.jsonl"), _jsonl(one / "evals.jsonl")):
        assert a.keys() == b.keys()
        np.testing.assert_allclose([a[k] for k in a], [b[k] for k in a], rtol=1e-5, atol=1e-6)


SCRIPT = """
import sys
import jax, numpy as np
import fedjax_pfl as fp
from fedjax_pfl import distributed
num, pid, port, out = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
if num > 1:
    distributed.initialize(f"127.0.0.1:{port}", num, pid, local_devices=1)
else:
    fp.use_cpu_devices(2)
m = 8
train, test, info = fp.data.federated_dataset("synthetic", num_clients=m, seed=0)
if num > 1:  # this process's clients only, as global arrays
    block = distributed.client_block(m)
    train, test = (distributed.place_clients(jax.tree.map(lambda a: a[block], d), m)
                   for d in (train, test))
model = fp.models.MODELS["mlp"](info["input_shape"], info["num_classes"])
algo = fp.algorithms.fedavg(model, clients_per_round=4, local_steps=2, execution="sharded")
result = fp.simulate(algo, train, test, rounds=4, eval_every=2, seed=1, progress=False,
                     mesh=fp.client_mesh())
params = jax.tree.leaves(distributed.to_host(result.state.params))
if jax.process_index() == 0:
    np.savez(out, *params, loss=[h["train_loss"] for h in result.history],
             client_loss=result.client_metrics["loss"], devices=jax.device_count())
"""


@pytest.mark.slow
def test_simulate_in_two_processes_matches_one_process(tmp_path):
    script = tmp_path / "run.py"
    script.write_text(SCRIPT)
    port = str(_free_port())
    _launch([[sys.executable, str(script), "2", str(i), port, "two.npz"] for i in range(2)],
            tmp_path)
    _launch([[sys.executable, str(script), "1", "0", port, "one.npz"]], tmp_path)
    one, two = np.load(tmp_path / "one.npz"), np.load(tmp_path / "two.npz")
    assert int(one["devices"]) == int(two["devices"]) == 2
    assert sorted(one.files) == sorted(two.files) and len(one["loss"]) == 4
    for name in one.files:
        np.testing.assert_allclose(two[name], one[name], rtol=1e-5, atol=1e-6, err_msg=name)


@pytest.mark.slow
def test_a_check_failing_on_process_0_stops_every_process_at_once(tmp_path):
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "rounds.jsonl").write_text("{}\n")
    port = _free_port()
    argvs = [[*CLI, "--devices", "1", "--num-processes", "2", "--process-id", str(i),
              "--coordinator", f"127.0.0.1:{port}", "--out", "taken"] for i in range(2)]
    procs = [subprocess.Popen(a, cwd=tmp_path, env=_env(), stderr=subprocess.PIPE, text=True)
             for a in argvs]
    try:
        errs = [p.communicate(timeout=120)[1] for p in procs]  # not JAX's 300 s barrier
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert [p.returncode for p in procs] == [1, 1]
    assert "error: out: 'taken' exists and is not empty" in errs[0]
    assert "error: process 0 stopped the run (see its error)." in errs[1]
