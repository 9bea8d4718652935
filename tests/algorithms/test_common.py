"""Conformance suite run over every registered algorithm.

Each algorithm must: run under jit and inside `lax.scan`; keep its state's
structure, shapes and dtypes; compile once; be deterministic in its key; be
unaffected by padding rows and by extra empty clients; leave the rows of
clients outside the cohort bit-identical; stay finite; equal the plain
per-client loop `testing.naive_round`; and give the same result under every
execution strategy.
"""

import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedjax_pfl import cli, models, testing
from fedjax_pfl.algorithms import ALGORITHMS
from fedjax_pfl.core import sampling
from fedjax_pfl.core.execution import Execution
from fedjax_pfl.simulate import run_rounds, simulate

MODEL = models.mlp((6,), 3, hidden=(8,))
BASE = {"batch_size": 4, "local_steps": 3, "client_lr": 0.1}
EXTRA = {  # per-algorithm settings so that every code path is exercised
    "fedprox": {"mu": 0.5},
    "fedavg_ft": {"ft_steps": 2},
    "meta_fl": {"nu": 2, "inner_lr": 0.05},  # exact mode, independent Hessian batches
    "per_fedavg": {"inner_lr": 0.05},  # HF mode
    "pfedme": {"inner_steps": 2, "lam": 2.0},
    "fedfew": {"num_models": 2, "mu": 0.1},  # K=2 keeps the compiles cheap
    "ifca": {"num_models": 2},
    "hypcluster": {"num_models": 2},
    "fedem": {"num_models": 2},
    # 2 slots, and a split in the first round (every cluster of >= 2 members qualifies)
    "cfl": {"max_clusters": 2, "warmup_rounds": 0, "eps1": 1e3, "eps2": 0.0},
    "fedbabu": {"ft_steps": 2},
}
SHARED_INIT = ("ifca", "hypcluster", "fedem")  # K copies of one given init need init="shared"
COHORT = 5
# The cheap checks and the naive-loop comparison share one configuration (and one
# compile: tests/conftest.py keeps each algorithm's tests on one xdist worker).
SHARED = {"clients_per_round": COHORT, "local_steps": None, "local_epochs": 2}
ROUND_KEY = jax.random.key(42)


@functools.cache
def _build(name, overrides):
    config = {**BASE, **EXTRA.get(name, {}), **dict(overrides)}
    algo = ALGORITHMS[name](MODEL, **config)
    return algo, config, jax.jit(algo.round), jax.jit(algo.evaluate)


def build(name, **overrides):
    """(algorithm, its config, jitted round, jitted evaluate), cached across tests
    so that configurations shared by several tests compile once."""
    return _build(name, tuple(sorted(overrides.items(), key=lambda kv: kv[0])))


@pytest.fixture(params=sorted(ALGORITHMS))
def name(request):
    return request.param


def init(algo, train):
    return algo.init(jax.random.key(0), train)


def shapes(tree):
    return jax.tree.map(lambda a: (a.shape, a.dtype), tree)


def test_every_algorithm_has_a_naive_reference():
    assert set(ALGORITHMS) <= set(testing.NAIVE_ROUNDS)


@pytest.mark.costly
def test_round_preserves_state_shapes_compiles_once_and_is_finite(name, tiny_train, tiny_test):
    algo, _, round_fn, evaluate = build(name, **SHARED)
    state = init(algo, tiny_train)
    assert jax.eval_shape(algo.round, state, tiny_train, ROUND_KEY)[0] == jax.eval_shape(
        lambda s: s, state)
    for r in range(3):  # new keys and new state values: no retrace
        new, metrics = round_fn(state, tiny_train, jax.random.fold_in(ROUND_KEY, r))
        assert jax.tree.structure(new) == jax.tree.structure(state)
        assert shapes(new) == shapes(state)
        for leaf in jax.tree.leaves((new, metrics)):
            assert np.all(np.isfinite(np.asarray(leaf)))
        state = new
    assert round_fn._cache_size() == 1
    per_client = evaluate(state, tiny_train, tiny_test)
    for key, value in per_client.items():
        assert np.shape(value)[:1] == (tiny_train.num_clients,), key
        assert np.all(np.isfinite(np.asarray(value))), key


@pytest.mark.costly
def test_scan_blocks_equal_one_block(name, tiny_train):
    algo = build(name, clients_per_round=COHORT)[0]
    block = jax.jit(run_rounds, static_argnums=(0, 4))
    key = jax.random.key(7)
    one, m_one = block(algo.round, init(algo, tiny_train), tiny_train, key, 4)
    two, m_a = block(algo.round, init(algo, tiny_train), tiny_train, key, 2)
    two, m_b = block(algo.round, two, tiny_train, key, 2)
    testing.assert_trees_close(one, two, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(m_one["train_loss"],
                               np.concatenate([m_a["train_loss"], m_b["train_loss"]]), rtol=1e-6)
    assert int(one.round) == 4


def test_state_leaves_have_their_own_buffers(name, tiny_train):
    # `simulate` donates the state: two leaves sharing one buffer fail ("donate the same
    # buffer twice") once the state is placed on a device mesh.
    state = init(build(name, **SHARED)[0], tiny_train)
    pointers = [a.unsafe_buffer_pointer() for a in jax.tree.leaves(state)
                if isinstance(a, jax.Array)]
    assert len(set(pointers)) == len(pointers)


def test_same_key_same_result_other_key_differs(name, tiny_train):
    algo, _, round_fn, _ = build(name, **SHARED)
    state = init(algo, tiny_train)
    a, _ = round_fn(state, tiny_train, ROUND_KEY)
    b, _ = round_fn(state, tiny_train, ROUND_KEY)
    c, _ = round_fn(state, tiny_train, jax.random.key(43))
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(x, y)
    assert any(not np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(c)))


@pytest.mark.costly
@pytest.mark.parametrize("schedule", [{"local_steps": 3}, {"local_steps": None, "local_epochs": 2}])
def test_padding_rows_change_nothing(name, tiny_train, schedule):
    algo, _, round_fn, _ = build(name, clients_per_round=COHORT, **schedule)
    padded = tiny_train.pad_examples(tiny_train.max_examples + 9)
    a, ma = round_fn(init(algo, tiny_train), tiny_train, ROUND_KEY)
    b, mb = round_fn(init(algo, padded), padded, ROUND_KEY)
    testing.assert_trees_close(a, b, rtol=1e-6, atol=1e-6)
    testing.assert_trees_close(ma, mb, rtol=1e-6, atol=1e-6)


@pytest.mark.costly
def test_extra_empty_clients_change_nothing(name, tiny_train, tiny_test):
    algo, _, round_fn, evaluate = build(name)  # full participation: empty clients take part
    m = tiny_train.num_clients
    more = tiny_train.pad_clients(m + 4)
    a, ma = round_fn(init(algo, tiny_train), tiny_train, ROUND_KEY)
    b, mb = round_fn(init(algo, more), more, ROUND_KEY)
    rows = lambda t: jax.tree.map(lambda x: x[:m] if x.ndim and x.shape[0] == m + 4 else x, t)
    testing.assert_trees_close(a, rows(b), rtol=1e-6, atol=1e-6)
    testing.assert_trees_close(ma, mb, rtol=1e-6, atol=1e-6)
    ea = evaluate(a, tiny_train, tiny_test)
    eb = evaluate(b, more, tiny_test.pad_clients(m + 4))
    testing.assert_trees_close(ea, rows(eb), rtol=1e-5, atol=1e-5)


def test_clients_outside_cohort_untouched(name, tiny_train):
    algo, _, round_fn, _ = build(name, **SHARED)
    state = init(algo, tiny_train)
    new, _ = round_fn(state, tiny_train, ROUND_KEY)
    ids = np.asarray(sampling.sample_cohort(sampling.round_keys(ROUND_KEY)[0],
                                            tiny_train.num_clients, COHORT))
    outside = np.setdiff1d(np.arange(tiny_train.num_clients), ids)
    m = tiny_train.num_clients
    for before, after in zip(jax.tree.leaves(state), jax.tree.leaves(new)):
        if before.ndim and before.shape[0] == m:
            np.testing.assert_array_equal(np.asarray(before)[outside], np.asarray(after)[outside])


@pytest.mark.parametrize("cohort", [COHORT, pytest.param(None, marks=pytest.mark.costly)])
def test_equals_naive_per_client_loop(name, tiny_train, cohort):
    algo, config, round_fn, _ = build(name, **{**SHARED, "clients_per_round": cohort})
    state = init(algo, tiny_train)
    for r in range(2):
        key = jax.random.fold_in(ROUND_KEY, r)
        want, want_metrics = testing.naive_round(name, MODEL, state, tiny_train, key, **config)
        state, metrics = round_fn(state, tiny_train, key)
        testing.assert_trees_close(state, want, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(metrics["train_loss"], want_metrics["train_loss"], rtol=1e-5)


# Options off by default that change the round: each must also equal the naive loop.
OPTIONS = [
    ("ditto", {"personal_steps": 5}),  # epoch-mode global copy, step-mode personal model
    ("ditto", {"personal_epochs": 1}),
    ("pfedme", {"train_all_clients": True, "mu": 0.3}),  # the released code's round
]


@pytest.mark.parametrize("name,options", OPTIONS, ids=[
    f"{n}-" + "-".join(f"{k}={v}" for k, v in o.items()) for n, o in OPTIONS])
@pytest.mark.costly
def test_options_equal_naive_per_client_loop(name, options, tiny_train):
    algo, config, round_fn, _ = build(name, clients_per_round=COHORT, local_steps=None,
                                      local_epochs=2, **options)
    state = init(algo, tiny_train)
    for r in range(2):
        key = jax.random.fold_in(ROUND_KEY, r)
        want, want_metrics = testing.naive_round(name, MODEL, state, tiny_train, key, **config)
        state, metrics = round_fn(state, tiny_train, key)
        testing.assert_trees_close(state, want, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(metrics["train_loss"], want_metrics["train_loss"], rtol=1e-5)


@pytest.mark.parametrize("eval_lr", [None, pytest.param(0.3, marks=pytest.mark.costly)],
                         ids=["eval_lr=None", "eval_lr=0.3"])
@pytest.mark.parametrize("name", sorted(testing.NAIVE_EVALUATES))
def test_evaluate_equals_naive_reference(name, eval_lr, tiny_train, tiny_test):
    """Evaluations that fine-tune first (meta-FL, Per-FedAvg) equal their naive loop."""
    algo, config, round_fn, evaluate = build(name, clients_per_round=COHORT, eval_lr=eval_lr)
    state, _ = round_fn(init(algo, tiny_train), tiny_train, ROUND_KEY)
    got = evaluate(state, tiny_train, tiny_test)
    want = testing.naive_evaluate(name, MODEL, state, tiny_train, tiny_test, **config)
    assert set(want) <= set(got)
    testing.assert_trees_close({k: got[k] for k in want}, want, rtol=1e-5, atol=1e-5)


@pytest.mark.costly
@pytest.mark.parametrize("execution", [
    Execution("chunked", chunk_size=2), Execution("sharded"), Execution("sharded", chunk_size=2)],
    ids=["chunked", "sharded", "sharded+chunked"])
def test_execution_strategies_agree(name, tiny_train, tiny_test, execution):
    assert jax.device_count() >= 2, "conftest should force several CPU devices"
    ref, _, ref_round, ref_eval = build(name, clients_per_round=COHORT)
    other, _, other_round, other_eval = build(name, clients_per_round=COHORT, execution=execution)
    a = b = init(ref, tiny_train)
    for r in range(2):
        key = jax.random.fold_in(ROUND_KEY, r)
        a, ma = ref_round(a, tiny_train, key)
        b, mb = other_round(b, tiny_train, key)
    testing.assert_trees_close(a, b, rtol=1e-5, atol=1e-6)
    testing.assert_trees_close(ma, mb, rtol=1e-5, atol=1e-6)
    testing.assert_trees_close(ref_eval(a, tiny_train, tiny_test),
                               other_eval(b, tiny_train, tiny_test), atol=1e-5)


@pytest.mark.costly
def test_hparams_are_traced_and_sweepable(name, tiny_train):
    """A vmap over a grid of learning rates runs in one compile and each row
    equals the single run with that learning rate."""
    algo, _, round_fn, _ = build(name, clients_per_round=COHORT)
    state = init(algo, tiny_train)
    lrs = jnp.array([0.01, 0.2])
    grid = jax.vmap(lambda lr: state.replace(hparams={**state.hparams, "client_lr": lr}))(lrs)
    swept, _ = jax.jit(jax.vmap(algo.round, in_axes=(0, None, None)))(grid, tiny_train, ROUND_KEY)
    for j, lr in enumerate(lrs):
        single = state.replace(hparams={**state.hparams, "client_lr": lr})
        want, _ = round_fn(single, tiny_train, ROUND_KEY)
        testing.assert_trees_close(jax.tree.map(lambda a, j=j: a[j], swept), want, atol=1e-6)


# The sharded driver path of every algorithm runs through the CLI test below (fast tier).
@pytest.mark.parametrize("execution", [
    "vmap", pytest.param(Execution("chunked", chunk_size=2), marks=pytest.mark.costly)],
    ids=["vmap", "chunked"])
def test_runs_through_simulate_checkpoint_and_resume(name, tiny_train, tiny_test, execution,
                                                     tmp_path):
    """The user's path: donated blocks, evaluations between them, checkpoints, a resumed run
    bit-identical to an uninterrupted one, and a resume from the returned state."""
    algo = build(name, clients_per_round=COHORT, execution=execution)[0]
    run = functools.partial(simulate, algo, tiny_train, tiny_test, eval_every=2, progress=False,
                            checkpoint_every=2)
    whole = run(rounds=6, out=str(tmp_path / "whole"))
    run(rounds=4, out=str(tmp_path / "part"))
    resumed = run(rounds=6, out=str(tmp_path / "part"), resume=True)
    for file in ("rounds.jsonl", "evals.jsonl", "clients.csv"):
        assert (tmp_path / "whole" / file).read_text() == (tmp_path / "part" / file).read_text()
    testing.assert_trees_close(whole.state, resumed.state, rtol=0, atol=0)
    assert [e["round"] for e in whole.evals] == [0, 2, 4, 6]
    more = simulate(algo, tiny_train, tiny_test, rounds=2, state=whole.state, progress=False)
    assert int(more.state.round) == 8 and int(whole.state.round) == 6


@pytest.mark.parametrize("strategy", [  # vmap compiles 2-4x faster: the fast tier's variant
    ["--execution", "vmap"],
    pytest.param(["--execution", "sharded", "--chunk-size", "2"], marks=pytest.mark.costly),
    pytest.param(["--execution", "chunked", "--chunk-size", "2"], marks=pytest.mark.costly)],
    ids=["vmap", "sharded+chunked", "chunked"])
def test_runs_through_the_cli(name, strategy, tmp_path, capsys):
    out = tmp_path / "out"
    rc = cli.main(["run", "--algorithm", name, "--clients", "5", "--rounds", "2",
                   "--eval-every", "1", "--quiet", "--out", str(out), *strategy])
    assert rc == 0, capsys.readouterr().err
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "finished" and summary["final"]["round"] == 2
    assert len((out / "rounds.jsonl").read_text().splitlines()) == 2


@pytest.mark.costly
def test_given_cohort_equals_the_sampled_one(name, tiny_train):
    """`round(..., cohort=ids)` with the ids sampling would pick is the same round;
    another cohort changes only its own clients' rows."""
    algo, _, round_fn, _ = build(name, clients_per_round=COHORT)
    state = init(algo, tiny_train)
    sampled = sampling.sample_cohort(jax.random.fold_in(ROUND_KEY, 0), tiny_train.num_clients,
                                     COHORT)
    given = jax.jit(algo.round)
    want = round_fn(state, tiny_train, ROUND_KEY)
    testing.assert_trees_close(given(state, tiny_train, ROUND_KEY, sampled), want, rtol=0, atol=0)
    other = jnp.array([9, 0, 4, 2, 7], jnp.int32)  # unsorted, unlike sampled cohorts
    new, _ = given(state, tiny_train, ROUND_KEY, other)
    outside = np.setdiff1d(np.arange(tiny_train.num_clients), np.asarray(other))
    for old_leaf, new_leaf in zip(jax.tree.leaves(state), jax.tree.leaves(new)):
        if np.ndim(old_leaf) and np.shape(old_leaf)[0] == tiny_train.num_clients:
            np.testing.assert_array_equal(np.asarray(new_leaf)[outside],
                                          np.asarray(old_leaf)[outside])
    with pytest.raises(ValueError, match="cohort: expected 5 int client ids"):
        algo.round(state, tiny_train, ROUND_KEY, jnp.arange(4))


def test_init_from_given_params_equals_init_from_their_key(name, tiny_train):
    """`init(key, train, params)` builds the same state as an init whose model
    init gives `params` (K-model algorithms: K copies, as `init="shared"`)."""
    algo, _, _, _ = build(name, **({"init": "shared"} if name in SHARED_INIT else {}))
    given = MODEL.init(jax.random.key(7))
    got = algo.init(jax.random.key(0), tiny_train, jax.tree.map(np.asarray, given))
    want = algo.init(jax.random.key(7), tiny_train)
    if name == "fedfew":  # keeps its init key's data for the "local" evaluation
        got, want = got.replace(last_key=want.last_key), want
    testing.assert_trees_close(got, want, rtol=0, atol=0)


@pytest.mark.parametrize("name", ["fedfew", "ifca", "hypcluster", "fedem"])
def test_k_models_take_a_given_stack(name, tiny_train):
    algo, config, _, _ = build(name)
    stack = jax.vmap(MODEL.init)(jax.random.split(jax.random.key(3), config["num_models"]))
    state = algo.init(jax.random.key(0), tiny_train, stack)
    testing.assert_trees_close(state.params, stack, rtol=0, atol=0)


@pytest.mark.parametrize("mutate,match", [
    (lambda p: {k: v for k, v in p.items() if k != "head"}, "missing leaf 'head/bias'"),
    (lambda p: {**p, "extra": {"w": np.zeros(2)}}, "unexpected leaf 'extra/w'"),
    (lambda p: jax.tree.map(lambda a: np.zeros((a.shape[0] + 1,) + a.shape[1:]), p),
     r"leaf 'head/bias' has shape \(4,\), the model expects \(3,\)"),
    (lambda p: jax.tree.map(lambda a: np.full(a.shape, np.nan), p), "must hold finite"),
])
def test_given_params_are_checked_against_the_model(tiny_train, mutate, match):
    algo, _, _, _ = build("fedavg")
    params = jax.tree.map(np.asarray, MODEL.init(jax.random.key(1)))
    with pytest.raises(ValueError, match=match):
        algo.init(jax.random.key(0), tiny_train, mutate(params))


def _flat_equals_dense(name, train, test, **overrides):
    algo, _, round_fn, evaluate = build(name, **overrides)
    flat, flat_test = train.to_layout("flat"), test.to_layout("flat")
    assert flat.is_flat and not train.is_flat
    a, ma = round_fn(init(algo, train), train, ROUND_KEY)
    b, mb = round_fn(init(algo, flat), flat, ROUND_KEY)
    testing.assert_trees_close((a, ma), (b, mb), rtol=1e-6, atol=1e-6)
    testing.assert_trees_close(evaluate(a, train, test), evaluate(b, flat, flat_test),
                               rtol=1e-6, atol=1e-6)


@pytest.mark.costly
def test_flat_layout_equals_dense(name, tiny_train, tiny_test):
    """The flat store (rows gathered at offset + index) trains and evaluates exactly as
    the padded [M, N] layout: same minibatches, same permutations, same masks."""
    _flat_equals_dense(name, tiny_train, tiny_test, clients_per_round=COHORT)


@pytest.mark.costly
def test_flat_layout_equals_dense_epochs_sharded(name, tiny_train, tiny_test):
    """Epoch mode (permutations of each client's rows) with the store replicated
    to every device and chunks inside each device's block."""
    _flat_equals_dense(name, tiny_train, tiny_test, clients_per_round=COHORT, local_steps=None,
                       local_epochs=2, execution=Execution("sharded", chunk_size=2))
