"""Given initial parameters, given cohort schedules and per-round diagnostics, through
`simulate` and the CLI; and the FedFew / FedAPM defects fixed with them."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import fedjax_pfl as fp
from fedjax_pfl import cli, testing
from fedjax_pfl.algorithms import apfl, fedapm, fedavg, fedfew, ifca
from fedjax_pfl.algorithms import local_only as local
from fedjax_pfl.algorithms.fedfew import stch_weights
from fedjax_pfl.checkpoint import load_params, save_params
from fedjax_pfl.core import kmodels, sampling
from fedjax_pfl.core.execution import as_execution
from fedjax_pfl.core.server import evaluate_shared
from fedjax_pfl.simulate import seed_keys

MODEL = fp.models.mlp((6,), 3, hidden=(8,))
KW = {"batch_size": 4, "local_steps": 2, "client_lr": 0.1}


def sampled_schedule(seed, rounds, num_clients, size):
    """The cohorts `simulate(seed=seed)` samples: round r from fold_in(base, r)."""
    base = seed_keys(seed)[1]
    return np.stack([np.asarray(sampling.sample_cohort(
        sampling.round_keys(jax.random.fold_in(base, r))[0], num_clients, size))
        for r in range(rounds)])


def test_replayed_schedule_equals_sampling(tiny_train, tiny_test):
    algo = fedavg(MODEL, clients_per_round=4, **KW)
    plain = fp.simulate(algo, tiny_train, tiny_test, rounds=4, eval_every=2, seed=3,
                        progress=False)
    replay = fp.simulate(algo, tiny_train, tiny_test, rounds=4, eval_every=2, seed=3,
                         progress=False,
                         cohorts=sampled_schedule(3, 4, tiny_train.num_clients, 4))
    testing.assert_trees_close(replay.state, plain.state, rtol=0, atol=0)
    assert replay.history == plain.history and replay.evals == plain.evals


def test_schedule_trains_exactly_its_clients(tiny_train, tiny_test):
    schedule = np.array([[0, 1], [2, 5], [1, 2]])
    result = fp.simulate(local(MODEL, clients_per_round=2, **KW), tiny_train, tiny_test,
                         rounds=3, progress=False, cohorts=schedule)
    start = local(MODEL, clients_per_round=2, **KW).init(seed_keys(0)[0], tiny_train)
    moved = [not np.allclose(a[i], b[i]) for i in range(tiny_train.num_clients)
             for a, b in [(jax.tree.leaves(result.state.client_params)[0],
                           jax.tree.leaves(start.client_params)[0])]]
    assert [i for i, m in enumerate(moved) if m] == [0, 1, 2, 5]


@pytest.mark.parametrize("cohorts,match", [
    (np.array([0, 1]), r"cohorts: expected an int array \[rounds, clients_per_round\]"),
    (np.array([[0.0, 1.0]] * 3), "cohorts: expected an int array"),
    (np.array([[0, 1]] * 2), "expected at least 3 rows"),
    (np.array([[0, 1], [0, 11], [2, 3]]), r"row 1 has a client id outside \[0, 11\)"),
    (np.array([[0, 1], [4, 4], [2, 3]]), "row 1 repeats a client id"),
    (np.array([[0, 1, 2]] * 3), "cohort: expected 2 int client ids"),
])
def test_bad_schedules_are_refused(tiny_train, tiny_test, cohorts, match):
    with pytest.raises(ValueError, match=match):
        fp.simulate(fedavg(MODEL, clients_per_round=2, **KW), tiny_train, tiny_test, rounds=3,
                    progress=False, cohorts=cohorts)


def test_resume_refuses_another_schedule(tiny_train, tiny_test, tmp_path):
    algo = fedavg(MODEL, clients_per_round=2, **KW)
    schedule = np.array([[0, 1], [2, 5], [1, 2], [3, 4]])
    fp.simulate(algo, tiny_train, tiny_test, rounds=2, progress=False, cohorts=schedule,
                checkpoint_dir=str(tmp_path), checkpoint_every=1)
    with pytest.raises(ValueError, match="another cohort schedule"):
        fp.simulate(algo, tiny_train, tiny_test, rounds=4, progress=False, resume=True,
                    cohorts=schedule[::-1], checkpoint_dir=str(tmp_path))


@pytest.mark.slow
def test_init_params_through_simulate_and_grid(tiny_train, tiny_test):
    """The round-0 evaluation is the given model's; the server optimizer starts from it."""
    given = MODEL.init(jax.random.key(11))
    algo = fedavg(MODEL, server_optimizer="adam", server_lr=0.01, **KW)
    result = fp.simulate(algo, tiny_train, tiny_test, rounds=1, progress=False,
                         init_params=given)
    direct = evaluate_shared(MODEL, given, tiny_test, as_execution("vmap"))
    assert result.evals[0]["acc_weighted"] == pytest.approx(
        float(np.sum(direct["num_correct"]) / np.sum(direct["num_examples"])))
    [grid] = fp.simulate_grid(algo, tiny_train, tiny_test, seeds=[0], rounds=1, progress=False,
                              init_params=given)
    testing.assert_trees_close(grid.state.params, result.state.params, rtol=1e-6, atol=1e-7)
    with pytest.raises(ValueError, match="either state or init_params"):
        fp.simulate(algo, tiny_train, tiny_test, rounds=1, progress=False, init_params=given,
                    state=result.state)


def _diag_round(factory, train, **kw):
    plain, diag = factory(MODEL, **kw), factory(MODEL, diagnostics=True, **kw)
    state = plain.init(jax.random.key(0), train)
    key = jax.random.key(4)
    want, want_m = jax.jit(plain.round)(state, train, key)
    got, got_m = jax.jit(diag.round)(state, train, key)
    testing.assert_trees_close(got, want, rtol=0, atol=0)  # diagnostics change nothing
    np.testing.assert_array_equal(got_m["train_loss"], want_m["train_loss"])
    d = jax.tree.map(np.asarray, got_m["diagnostics"])
    np.testing.assert_array_equal(
        d["clients"], sampling.sample_cohort(sampling.round_keys(key)[0], train.num_clients,
                                             kw.get("clients_per_round")))
    return state, got, d


@pytest.mark.slow
def test_fedfew_diagnostics(tiny_train):
    state, _, d = _diag_round(fedfew, tiny_train, num_models=2, mu=0.1, clients_per_round=6,
                              **KW)
    n = np.asarray(tiny_train.num_examples)[d["clients"]]
    assert d["losses"].shape == d["w"].shape == (6, 2)
    w, alpha = stch_weights(jnp.asarray(d["losses"]), jnp.asarray(n), 0.1)
    np.testing.assert_allclose(d["w"], w, rtol=1e-6)
    np.testing.assert_allclose(d["alpha"], alpha, rtol=1e-6)
    np.testing.assert_allclose(d["w"].sum(1), 1.0, rtol=1e-6)
    assert d["alpha"].sum() == pytest.approx(1.0) and np.all(d["alpha"][n == 0] == 0)
    np.testing.assert_array_equal(d["model"], d["losses"].argmin(1))


@pytest.mark.slow
def test_ifca_diagnostics(tiny_train):
    state, _, d = _diag_round(ifca, tiny_train, num_models=2, clients_per_round=5, **KW)
    losses = jax.jit(jax.vmap(kmodels.train_losses, (None, None, 0)), static_argnums=0)(
        MODEL, state.params, tiny_train.take(jnp.asarray(d["clients"])))
    np.testing.assert_array_equal(d["model"], np.argmin(losses, axis=1))


@pytest.mark.slow
def test_fedapm_diagnostics(tiny_train):
    state, new, d = _diag_round(fedapm, tiny_train, clients_per_round=5, **KW)
    for s, i in enumerate(d["clients"]):
        dual = jax.tree.map(lambda a, i=i: a[i], new.client_dual)
        u_i = jax.tree.map(lambda a, i=i: a[i], new.client_shared)
        assert d["dual_norm"][s] == pytest.approx(float(optax.tree.norm(dual)), rel=1e-5)
        drift = sum(float(jnp.linalg.norm(a - b)) for a, b in
                    zip(jax.tree.leaves(u_i), jax.tree.leaves(state.shared)))
        assert d["drift"][s] == pytest.approx(drift, rel=1e-5)


def test_apfl_diagnostics(tiny_train):
    _, new, d = _diag_round(apfl, tiny_train, clients_per_round=5, **KW)
    np.testing.assert_array_equal(d["alpha"], np.asarray(new.client_alpha)[d["clients"]])


def test_diagnostics_written_as_the_run_goes(tiny_train, tiny_test, tmp_path):
    out = str(tmp_path / "run")
    result = fp.simulate(ifca(MODEL, num_models=2, diagnostics=True, **KW), tiny_train,
                         tiny_test, rounds=3, eval_every=2, progress=False, out=out)
    with open(os.path.join(out, "diagnostics.jsonl")) as f:
        lines = [json.loads(line) for line in f]
    assert [r["round"] for r in lines] == [1, 2, 3] and lines == result.diagnostics
    assert len(lines[0]["clients"]) == len(lines[0]["model"]) == tiny_train.num_clients
    assert "model" not in result.history[0]  # not averaged into the round metrics


def test_fedfew_local_protocol_reads_params_before_any_round(tiny_train, tiny_test):
    """Round 0: "local" evaluates the current (here injected) models, as "server" does."""
    local_, server = (fedfew(MODEL, num_models=2, eval_protocol=p, **KW) for p in
                      ("local", "server"))
    state = local_.init(jax.random.key(0), tiny_train)
    state = state.replace(params=jax.vmap(MODEL.init)(jax.random.split(jax.random.key(9), 2)))
    got = jax.jit(local_.evaluate)(state, tiny_train, tiny_test)
    want = jax.jit(server.evaluate)(state, tiny_train, tiny_test)
    np.testing.assert_array_equal(got["num_correct"], want["num_correct"])
    np.testing.assert_allclose(got["loss_sum"], want["loss_sum"], rtol=1e-6)


def test_fedapm_refuses_steps_and_epochs_together():
    with pytest.raises(ValueError, match="local_steps / local_epochs: set at most one"):
        fedapm(MODEL, local_steps=2, local_epochs=1)
    assert fedapm(MODEL, local_steps=2) is not None  # steps alone replace the 3 default epochs


@pytest.mark.slow
def test_cli_replays_a_schedule_from_given_params(tmp_path, capsys):
    model = fp.models.mlp((64,), 10)
    params_file = str(tmp_path / "init.npz")
    save_params(params_file, model.init(jax.random.key(5)))
    testing.assert_trees_close(load_params(params_file), model.init(jax.random.key(5)),
                               rtol=0, atol=0)
    schedule = str(tmp_path / "cohorts.csv")
    np.savetxt(schedule, [[0, 1], [2, 3]], fmt="%d", delimiter=",")
    out = str(tmp_path / "run")
    args = ["run", "--algorithm", "fedfew", "--clients", "4", "--rounds", "2", "--eval-every",
            "1", "--quiet", "--init-params", params_file, "--cohorts", schedule, "--out", out,
            "--set", "clients_per_round=2", "--set", "diagnostics=true", "--set", "num_models=2"]
    assert cli.main(args) == 0
    with open(os.path.join(out, "diagnostics.jsonl")) as f:
        assert [json.loads(line)["clients"] for line in f] == [[0, 1], [2, 3]]
    bad = str(tmp_path / "bad.npz")
    with open(bad, "w") as f:
        f.write("garbage")
    assert cli.main([*args[:10], "--init-params", bad, "--out", str(tmp_path / "b")]) == 1
    assert f"init_params: cannot read {bad!r}" in capsys.readouterr().err
