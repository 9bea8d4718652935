"""Tests of `fp.sweep`: grid expansion, grouping, results, resume and the `sweep` command."""

import importlib
import json
import os
import shutil

import numpy as np
import pandas as pd
import pytest

import fedjax_pfl as fp
from fedjax_pfl import cli

sweep_lib = importlib.import_module("fedjax_pfl.sweep")  # `fp.sweep` is the function
grid_lib = importlib.import_module("fedjax_pfl.grid")

# 2 algorithms x 2 client counts x 2 seeds x 2 learning rates, a few seconds in all.
GRID = {"algorithm": ["fedavg", "fedprox"], "clients": [4, 6], "seed": [0, 1],
        "client_lr": [0.05, 0.1], "mu": [0.01]}
BASE = {"dataset": "synthetic", "model": "logreg", "rounds": 2, "eval_every": 1}
FIXED = {"local_steps": 2}
TRACED = {"client_lr", "server_lr", "mu"}  # fedavg/fedprox `state.hparams`


def test_expansion_passes_keywords_only_to_algorithms_that_take_them():
    points = sweep_lib.expand_grid(GRID, BASE, FIXED)
    fedavg = [p for p in points if p.run["algorithm"] == "fedavg"]
    fedprox = [p for p in points if p.run["algorithm"] == "fedprox"]
    assert len(fedavg) == len(fedprox) == 8  # fedavg is not multiplied by (nor given) mu
    assert all("mu" not in p.kwargs and p.grid["mu"] is None for p in fedavg)
    assert all(p.kwargs["mu"] == 0.01 and p.kwargs["local_steps"] == 2 for p in fedprox)
    assert all(p.run["data_seed"] == 0 and p.run["rounds"] == 2 for p in points)
    assert points[0].run["alpha"] == 1.0  # the synthetic default is resolved
    ids = [p.id for p in points]
    assert len(set(ids)) == len(ids)
    assert ids == [p.id for p in sweep_lib.expand_grid(GRID, BASE, FIXED)]
    assert ids[0].startswith("fedavg-synthetic-M4-dirichlet-seed0-client_lr0.05-")
    assert len(ids[0].rsplit("-", 1)[1]) == 8

    alone = sweep_lib.expand_grid({"algorithm": ["fedavg"], "mu": [0.0, 0.1]}, BASE)
    assert [p.kwargs["mu"] for p in alone] == [0.0, 0.1]  # fedavg alone does take mu
    local = sweep_lib.expand_grid({"algorithm": ["fedavg", "local"], "mu": [0.1, 0.2]}, BASE)
    assert [(p.run["algorithm"], p.kwargs.get("mu")) for p in local] == [
        ("fedavg", 0.1), ("fedavg", 0.2), ("local", None)]


def _groups(grid, base=BASE, fixed=FIXED, traced=TRACED):
    points = sweep_lib.expand_grid(grid, base, fixed)
    return [[(p.run["algorithm"], p.run["clients"], p.run["seed"], p.kwargs.get("client_lr"))
             for p in g] for g in sweep_lib.group_points(points, lambda p: traced)]


def test_grouping_vmaps_only_seeds_and_traced_numbers():
    groups = _groups(GRID)
    assert [len(g) for g in groups] == [4, 4, 4, 4]
    assert [g[0][:2] for g in groups] == [("fedavg", 4), ("fedavg", 6), ("fedprox", 4),
                                          ("fedprox", 6)]
    assert sorted(groups[0]) == [("fedavg", 4, s, lr) for s in (0, 1) for lr in (0.05, 0.1)]
    # Structural keywords, data options and untraced numbers split groups.
    assert [len(g) for g in _groups({"local_epochs": [1, 2], "seed": [0, 1]}, fixed={})] == [2, 2]
    assert [len(g) for g in _groups({"data_seed": [0, 1], "seed": [0, 1]})] == [2, 2]
    assert len(_groups({"client_lr": [0.1, 0.2]}, traced=set())) == 2
    assert len(_groups({"client_lr": [0.1, 0.2], "mu": [0.0, 1.0]})) == 1


BAD = {
    "unknown grid key": (dict(grid={"nope": [1]}), "nope"),
    "empty list": (dict(grid={"client_lr": []}), "client_lr"),
    "not a list": (dict(grid={"client_lr": 0.1}), "client_lr"),
    "unknown sweep key": (dict(grid={"seed": [0]}, base={"roundz": 3}), "roundz"),
    "unknown algorithm": (dict(grid={"algorithm": ["nope"]}), "algorithm"),
    "nobody takes it": (dict(grid={"algorithm": ["local"], "mu": [0.1]}), "mu"),
    "in two tables": (dict(grid={"seed": [0]}, base={"seed": 1}), "seed"),
    "wrong type": (dict(grid={"rounds": ["ten"]}), "rounds"),
    "devices in grid": (dict(grid={"devices": [1, 2]}), "devices"),
    "alpha for iid": (dict(grid={"partition": ["iid"]}, base={"alpha": 0.3}), "alpha"),
    "bad value": (dict(grid={"client_lr": [-1.0]}), "client_lr"),
}


@pytest.mark.parametrize("name", BAD)
def test_bad_specs_are_one_line_errors_naming_the_key(name, tmp_path):
    spec, key = BAD[name]
    with pytest.raises(ValueError) as e:
        fp.sweep(spec["grid"], base=spec.get("base"), out=str(tmp_path / "out"), progress=False)
    message = str(e.value)
    assert "\n" not in message and message.startswith(f"{key}:"), message
    assert not (tmp_path / "out").exists()


@pytest.fixture(scope="module")
def swept(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("sweep") / "out")
    return out, fp.sweep(GRID, base=BASE, algorithm_kwargs=FIXED, out=out, progress=False)


@pytest.mark.slow
def test_sweep_writes_table_points_and_plots(swept):
    out, frame = swept
    assert len(frame) == 16 and set(frame["status"]) == {"finished"}
    assert frame["group"].nunique() == 4
    table = pd.read_csv(os.path.join(out, "table.csv"))
    assert list(table["id"]) == list(frame["id"])
    for column in ("algorithm", "clients", "seed", "client_lr", "mu", "acc_weighted", "acc_mean",
                   "acc_min", "loss_weighted", "best_acc_weighted", "seconds_per_round",
                   "wall_seconds", "status", "dir"):
        assert column in table, column
    assert table["mu"].isna().sum() == 8
    for d in table["dir"]:
        summary = json.load(open(os.path.join(out, d, "summary.json")))
        assert summary["status"] == "finished" and summary["final"]["round"] == 2
    spec = json.load(open(os.path.join(out, "sweep.json")))
    assert spec["grid"] == GRID and spec["sweep"]["rounds"] == 2
    assert sorted(os.listdir(os.path.join(out, "plots"))) == [
        "accuracy_curves.png", "accuracy_vs_client_lr.png", "accuracy_vs_clients.png",
        "round_time_vs_clients.png"]


@pytest.mark.slow
def test_vmapped_points_equal_single_runs(swept):
    out, frame = swept
    points = sweep_lib.expand_grid(GRID, BASE, FIXED)
    for p in points[:2] + points[-1:]:  # two of the first vmapped group, one of the last
        algorithm, train, test, _ = cli._build(dict(p.run), p.kwargs)
        final = fp.simulate(algorithm, train, test, rounds=2, eval_every=1, seed=p.run["seed"],
                            progress=False).final()
        row = frame[frame["id"] == p.id].iloc[0]
        for key in ("acc_weighted", "acc_mean", "loss_weighted"):
            np.testing.assert_allclose(row[key], final[key], rtol=1e-5, atol=1e-5, err_msg=key)


@pytest.mark.slow
def test_resume_reruns_only_unfinished_groups_and_refuses_another_spec(swept, tmp_path,
                                                                       monkeypatch):
    out = str(tmp_path / "out")
    shutil.copytree(swept[0], out)
    frame = swept[1]
    victim = frame[frame["group"] == 2].iloc[1]
    os.remove(os.path.join(out, victim["dir"], "summary.json"))
    mtimes = {d: os.path.getmtime(os.path.join(out, d, "summary.json"))
              for d in frame["dir"] if d != victim["dir"]}
    calls = []
    real = grid_lib.simulate_grid
    monkeypatch.setattr(grid_lib, "simulate_grid",
                        lambda *a, **k: calls.append(k["outs"]) or real(*a, **k))
    again = fp.sweep(GRID, base=BASE, algorithm_kwargs=FIXED, out=out, progress=False)
    assert len(calls) == 1 and os.path.join(out, victim["dir"]) in calls[0]
    assert len(calls[0]) == 4  # the whole vmapped group
    changed = {d for d, t in mtimes.items()
               if os.path.getmtime(os.path.join(out, d, "summary.json")) != t}
    assert changed == set(frame[frame["group"] == 2]["dir"]) - {victim["dir"]}
    assert len(again) == 16 and set(again["status"]) == {"finished"}
    np.testing.assert_allclose(again["acc_weighted"], frame["acc_weighted"], atol=1e-6)

    with pytest.raises(ValueError, match="^out: .*different sweep"):
        fp.sweep(GRID, base={**BASE, "rounds": 3}, algorithm_kwargs=FIXED, out=out)


TOML = """
[sweep]
dataset = "synthetic"
model = "mlp"
clients = 4
rounds = 2
eval_every = 1
[grid]
seed = [0]
client_lr = [0.1, 1e10]
[algorithm]
local_steps = 2
"""


@pytest.mark.slow  # fast-tier budget: runs in the slow tier (CI runs both)
def test_sweep_command_records_a_diverged_point_and_continues(tmp_path, capsys):
    (tmp_path / "s.toml").write_text(TOML)
    out = tmp_path / "out"
    rc = cli.main(["sweep", str(tmp_path / "s.toml"), "--out", str(out), "--quiet"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert "[1/1] fedavg synthetic M=4 (2 points, vmapped)" in captured.err
    table = pd.read_csv(out / "table.csv")
    assert list(table["status"]) == ["finished", "diverged"]
    assert "2 points" in captured.out and "diverged" in captured.out

    (tmp_path / "s.toml").write_text(TOML.replace("rounds = 2", "rounds = 1"))
    rc = cli.main(["sweep", str(tmp_path / "s.toml"), "--out", str(out), "--quiet",
                   "--overwrite"])
    assert rc == 0 and set(pd.read_csv(out / "table.csv")["status"]) <= {"finished",
                                                                       "diverged"}


@pytest.mark.parametrize("text, expected", [
    ("[grid\nseed = [0]\n", "invalid TOML"),
    ("[grid]\nnope = [1]\n", "nope"),
    ("[grids]\nseed = [0]\n", "grids"),
    ("[grid]\nseed = []\n", "seed")])
def test_bad_sweep_file_exits_with_one_line(text, expected, tmp_path, capsys):
    (tmp_path / "s.toml").write_text(text)
    rc = cli.main(["sweep", str(tmp_path / "s.toml"), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert rc != 0 and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1 and expected in err, err
