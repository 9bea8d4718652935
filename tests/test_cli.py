"""Tests of the `fedjax-pfl` command line (run, list, demo and its error messages)."""

import csv
import dataclasses
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

import fedjax_pfl as fp
from fedjax_pfl import cli, demo

# A run that compiles and finishes in a few seconds.
TINY = ["--clients", "5", "--model", "logreg", "--rounds", "2", "--eval-every", "1", "--quiet"]


def _read_jsonl(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def _assert_one_line_error(capsys, rc):
    err = capsys.readouterr().err
    assert rc != 0
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("fedjax-pfl"), err
    return lines[0]


def test_run_writes_results_directory(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the default results/<algorithm>-<dataset>-<time>
    rc = cli.main(["run", *TINY, "--set", "client_lr=0.1", "--set", "local_steps=3"])
    assert rc == 0
    (out,) = (tmp_path / "results").iterdir()
    assert out.name.startswith("fedavg-digits-")
    assert {p.name for p in out.iterdir()} >= {
        "config.json", "rounds.jsonl", "evals.jsonl", "clients.csv", "summary.json"}

    config = json.loads((out / "config.json").read_text())
    assert config["run"]["algorithm"] == "fedavg" and config["run"]["dataset"] == "digits"
    assert config["run"]["rounds"] == 2 and config["run"]["clients"] == 5
    assert config["run"]["alpha"] == 0.5  # the Dirichlet default is recorded
    assert config["algorithm"] == {"client_lr": 0.1, "local_steps": 3}
    assert config["data"]["num_classes"] == 10

    rounds = _read_jsonl(out / "rounds.jsonl")
    assert [r["round"] for r in rounds] == [1, 2]
    assert all(math.isfinite(r["train_loss"]) and r["train_loss"] > 0 for r in rounds)
    evals = _read_jsonl(out / "evals.jsonl")
    assert [e["round"] for e in evals] == [0, 1, 2]
    assert all(0.0 <= e["acc_weighted"] <= 1.0 for e in evals)
    with open(out / "clients.csv") as f:
        clients = list(csv.DictReader(f))
    assert len(clients) == 15 and {"round", "client", "accuracy", "loss"} <= set(clients[0])
    assert [int(c["round"]) for c in clients[::5]] == [0, 1, 2]  # every evaluation is kept
    summary = json.loads((out / "summary.json").read_text())
    assert summary["final"]["round"] == 2
    assert summary["final"]["acc_weighted"] == pytest.approx(evals[-1]["acc_weighted"])

    stdout = capsys.readouterr().out
    for text in ("accuracy weighted", "accuracy unweighted mean", "accuracy p10",
                 "accuracy p90", "Jain index", "best round", str(out.name)):
        assert text in stdout


def test_config_file_is_honoured_and_flags_override_it(tmp_path, capsys):
    cfg = tmp_path / "cfg.toml"
    cfg.write_text('[run]\nalgorithm = "fedprox"\nrounds = 3\nclients = 6\nmodel = "logreg"\n'
                   'partition = "iid"\neval_every = 3\n\n[algorithm]\nmu = 0.1\nclient_lr = 0.2\n')
    out = tmp_path / "out"
    rc = cli.main(["run", "--config", str(cfg), "--rounds", "1", "--set", "mu=0.5",
                   "--out", str(out), "--quiet"])
    assert rc == 0, capsys.readouterr().err
    config = json.loads((out / "config.json").read_text())
    run = config["run"]
    assert (run["algorithm"], run["clients"], run["partition"], run["model"]) == (
        "fedprox", 6, "iid", "logreg")
    assert run["rounds"] == 1 and run["alpha"] is None
    assert config["algorithm"] == {"mu": 0.5, "client_lr": 0.2}
    assert len(_read_jsonl(out / "rounds.jsonl")) == 1


def test_list_prints_every_registered_name(capsys):
    assert cli.main(["list"]) == 0
    out = capsys.readouterr().out
    for name, factory in fp.ALGORITHMS.items():
        first_line = factory.__doc__.strip().splitlines()[0]
        assert any(line.split() and line.split()[0] == name and first_line in line
                   for line in out.splitlines()), name
    for registry in (fp.data.DATASETS, fp.data.PARTITIONS, fp.models.MODELS):
        for name in registry:
            assert f"  {name} " in out


@pytest.mark.parametrize("text, value", [
    ("3", 3), ("0.05", 0.05), ("1e-3", 1e-3), ("true", True), ("False", False),
    ("None", None), ("null", None), ("adam", "adam"), ("[64, 32]", [64, 32])])
def test_parse_value(text, value):
    assert cli.parse_value(text) == value


def test_accepted_kwargs_are_the_config_fields():
    fedavg = cli.accepted_kwargs(fp.ALGORITHMS["fedavg"])
    assert fedavg == {f.name for f in dataclasses.fields(fp.ALGORITHMS["fedavg"].config)}
    assert {"client_lr", "local_epochs", "mu"} <= fedavg
    assert fedavg <= cli.accepted_kwargs(fp.ALGORITHMS["fedavg_ft"])
    assert "ft_lr" in cli.accepted_kwargs(fp.ALGORITHMS["fedavg_ft"])
    assert "mu" not in cli.accepted_kwargs(fp.ALGORITHMS["local"])
    assert "nu" not in cli.accepted_kwargs(fp.ALGORITHMS["per_fedavg"])  # fixed to 1
    assert "head" in cli.accepted_kwargs(fp.ALGORITHMS["fedrep"])  # the old spelling


@pytest.mark.parametrize("algorithm,options", [
    ("ditto", ["personal_steps=2"]),
    ("ditto", ["personal_epochs=1", "local_steps=3"]),
    ("pfedme", ["train_all_clients=true", "mu=0.001", "clients_per_round=2", "local_steps=2"]),
    ("meta_fl", ["eval_lr=0.02", "local_steps=2"]),
    ("per_fedavg", ["eval_lr=0.02", "local_steps=2"])],
    ids=["ditto-steps", "ditto-epochs", "pfedme", "meta_fl", "per_fedavg"])
def test_algorithm_options_run_through_set(algorithm, options, tmp_path, capsys):
    """Options of the factories (here Ditto's personal schedule, pFedMe's released-code
    round and mu, meta-FL's evaluation step) are `--set` keys, recorded in config.json."""
    out = tmp_path / "out"
    flags = [arg for option in options for arg in ("--set", option)]
    rc = cli.main(["run", *TINY, "--algorithm", algorithm, *flags, "--out", str(out)])
    assert rc == 0, capsys.readouterr().err
    config = json.loads((out / "config.json").read_text())
    assert config["algorithm"] == {k: cli.parse_value(v) for k, v in
                                   (option.split("=") for option in options)}
    assert json.loads((out / "summary.json").read_text())["status"] == "finished"


BAD = {
    "unknown algorithm": (["--algorithm", "nope"], "unknown algorithm 'nope'"),
    "unknown dataset": (["--dataset", "nope"], "unknown dataset 'nope'"),
    "unknown partition": (["--partition", "nope"], "unknown partition 'nope'"),
    "unknown model": (["--model", "nope"], "unknown model 'nope'"),
    "unknown execution": (["--execution", "nope"], "unknown execution 'nope'"),
    "bad --set key": (["--set", "nope=1"], "has no option 'nope'"),
    "key of another algorithm": (["--algorithm", "local", "--set", "mu=0.1"], "'mu'"),
    "--set without =": (["--set", "client_lr"], "KEY=VALUE"),
    "negative rounds": (["--rounds", "-1"], "rounds"),
    "zero eval_every": (["--eval-every", "0"], "eval_every"),
    "non-int rounds": (["--rounds", "abc"], "--rounds"),
    "bad value": (["--set", "client_lr=-1"], "client_lr"),
    "bad personal_steps": (["--algorithm", "ditto", "--set", "personal_steps=0"],
                           "personal_steps"),
    "bad mu": (["--algorithm", "pfedme", "--set", "mu=-1"], "mu"),
    "bad train_all_clients": (["--algorithm", "pfedme", "--set", "train_all_clients=2"],
                              "train_all_clients"),
    "bad eval_lr": (["--algorithm", "per_fedavg", "--set", "eval_lr=-0.5"], "eval_lr"),
    "alpha for iid": (["--partition", "iid", "--alpha", "0.5"], "alpha"),
    "non-positive alpha": (["--alpha", "-1"], "alpha"),
    "unknown flag": (["--nope", "1"], "--nope"),
    "missing config": (["--config", "missing.toml"], "missing.toml"),
}
BAD_TOML = {
    "invalid toml": ("[run\nrounds = 1\n", "invalid TOML"),
    "unknown run key": ("[run]\nroundz = 1\n", "roundz"),
    "unknown table": ("[runs]\nrounds = 1\n", "runs"),
    "wrong type": ('[run]\nseed = "ten"\n', "seed"),
}


@pytest.mark.parametrize("name", list(BAD) + list(BAD_TOML))
def test_bad_input_exits_with_one_line(name, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    if name in BAD:
        flags, expected = BAD[name]
    else:
        text, expected = BAD_TOML[name]
        (tmp_path / "cfg.toml").write_text(text)
        flags = ["--config", "cfg.toml"]
    rc = cli.main(["run", *TINY, *flags, "--out", "out"])  # later flags win
    line = _assert_one_line_error(capsys, rc)
    assert expected in line
    assert not (tmp_path / "out").exists()


def test_unknown_command_exits_with_one_line(capsys):
    _assert_one_line_error(capsys, cli.main(["nope"]))


def test_devices_after_jax_started_is_a_one_line_error(tmp_path, capsys):
    import jax

    jax.devices()  # JAX is initialised in this process
    rc = cli.main(["run", "--devices", "7", *TINY, "--out", str(tmp_path / "out")])
    assert "already initialised" in _assert_one_line_error(capsys, rc)


def test_diverged_run_writes_partial_results_and_exits_1(tmp_path, capsys):
    out = tmp_path / "out"
    rc = cli.main(["run", *TINY, "--model", "mlp", "--set", "client_lr=1e10", "--out", str(out)])
    assert rc == 1
    line = _assert_one_line_error(capsys, rc)
    assert "training loss became" in line and str(out) in line
    assert json.loads((out / "summary.json").read_text())["status"] == "diverged"
    assert (out / "rounds.jsonl").exists() and (out / "evals.jsonl").exists()


@pytest.mark.slow
def test_demo_writes_table_figure_and_runs(tmp_path, capsys):
    # Zero rounds: every method is built, initialised and evaluated once (the rounds'
    # compiles, ~4 s a method, are left to test_demo.py's slow test).
    assert cli.main(["demo", "--rounds", "0", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    table = out[out.index("scenario  "):].split("\n\n")[0].splitlines()
    assert table[0].split() == list(demo.COLUMNS)
    assert len(table) == 1 + 9
    assert [row.split()[0] for row in table[1:]] == ["latent"] * 3 + ["fast"] * 3 + [
        "multimodal"] * 3
    for method in ("FedFew (K=3)", "IFCA (K=3)", "meta-FL (nu=2)", "Per-FedAvg", "FedAvg-FT",
                   "FedAPM", "FedAlt", "FedAvg"):
        assert method in out
    with open(tmp_path / "summary.csv") as f:
        assert len(list(csv.DictReader(f))) == 9
    assert (tmp_path / "demo.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (tmp_path / "multimodal" / "fedapm" / "summary.json").exists()
    assert len(list(tmp_path.glob("*/*/summary.json"))) == 9


def test_demo_rejects_bad_rounds(tmp_path, capsys):
    rc = cli.main(["demo", "--rounds", "-1", "--out", str(tmp_path / "out")])
    assert "rounds" in _assert_one_line_error(capsys, rc)
    assert not (tmp_path / "out").exists()


def _script() -> str:
    script = Path(sys.executable).with_name("fedjax-pfl")
    return str(script) if script.exists() else "fedjax-pfl"


def test_console_script_reports_errors_without_traceback(tmp_path):
    proc = subprocess.run([_script(), "run", "--algorithm", "nope"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines() == [
        "fedjax-pfl: error: algorithm: unknown algorithm 'nope'; expected one of "
        f"{sorted(fp.ALGORITHMS)}."]


@pytest.mark.slow  # fast-tier budget: runs in the slow tier (CI runs both)
def test_devices_flag_in_a_fresh_process(tmp_path):
    code = ("import sys, jax; from fedjax_pfl.cli import main; "
            "rc = main(sys.argv[1:]); print('devices', jax.device_count()); sys.exit(rc)")
    proc = subprocess.run(
        [sys.executable, "-c", code, "run", "--devices", "2", "--execution", "sharded",
         *TINY, "--out", "out"], cwd=tmp_path, capture_output=True, text=True, timeout=300,
        env={**os.environ, "XLA_FLAGS": ""})
    assert proc.returncode == 0, proc.stderr
    assert "devices 2" in proc.stdout
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["run"]["devices"] == 2 and config["run"]["execution"] == "sharded"
