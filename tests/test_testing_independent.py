"""The naive references of `fedjax_pfl.testing` are independent of the code they check.

They must not import the package's trainer, parameter splits, meta-gradients or
algorithms (a bug there would be copied into the reference), so (1) their
sources are parsed for imports, (2) their defaults are checked against the
factories, and (3) a deliberately broken local trainer must make the
conformance comparison FAIL.
"""

import ast
import inspect
import pathlib

import jax
import numpy as np
import optax
import pytest

from fedjax_pfl import models, testing
from fedjax_pfl.algorithms import ALGORITHMS
from fedjax_pfl.algorithms.fedavg import fedavg
from fedjax_pfl.core import local, sampling
from fedjax_pfl.testing import local_reference

TESTING_DIR = pathlib.Path(testing.__file__).parent
FORBIDDEN = ("fedjax_pfl.core.local", "fedjax_pfl.core.partial", "fedjax_pfl.core.params",
             "fedjax_pfl.core.metagrad", "fedjax_pfl.core.finetune", "fedjax_pfl.core.kmodels",
             "fedjax_pfl.algorithms")
# Everything of the package a reference may use: the model triple, the data
# container, the cohort / client-key draws, and the testing modules themselves.
ALLOWED = ("fedjax_pfl.models", "fedjax_pfl.data", "fedjax_pfl.core.sampling",
           "fedjax_pfl.testing")
SAMPLING_CALLS = {"round_keys", "client_keys", "sample_cohort"}
MODEL = models.mlp((6,), 3, hidden=(8,))
CONFIG = {"batch_size": 4, "client_lr": 0.1, "clients_per_round": 5}
KEY = jax.random.key(42)


def _modules():
    return sorted(TESTING_DIR.glob("*.py"))


def _dotted(node) -> str:
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    return ".".join([node.id, *reversed(parts)]) if isinstance(node, ast.Name) else ""


def _imported(tree: ast.AST, package: str) -> list[tuple[int, str]]:
    """(line, fully qualified module) of every import in a module of `package`.

    `from a.b import c` names `a.b.c` (c may be a module) as well as `a.b`.
    """
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative import
                parts = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([base] if base else []))
            out.append((node.lineno, base))
            out += [(node.lineno, f"{base}.{alias.name}") for alias in node.names]
        elif isinstance(node, ast.Attribute) and _dotted(node).startswith("fedjax_pfl."):
            out.append((node.lineno, _dotted(node)))  # e.g. fedjax_pfl.core.local.x after
            # `import fedjax_pfl.core`
        elif isinstance(node, ast.Call):
            fn = node.func
            name = fn.id if isinstance(fn, ast.Name) else getattr(fn, "attr", "")
            if name in ("__import__", "import_module"):
                out.append((node.lineno, f"<dynamic import via {name}>"))
    return out


def _is_under(module: str, prefix: str) -> bool:
    return module == prefix or module.startswith(prefix + ".")


@pytest.mark.parametrize("path", _modules(), ids=lambda p: p.name)
def test_references_import_none_of_the_code_they_check(path):
    tree = ast.parse(path.read_text(), filename=str(path))
    bad = []
    for line, module in _imported(tree, "fedjax_pfl.testing"):
        if module.startswith("<dynamic"):
            bad.append((line, module))
        elif any(_is_under(module, f) for f in FORBIDDEN):
            bad.append((line, module))
        elif _is_under(module, "fedjax_pfl") and module not in ("fedjax_pfl", "fedjax_pfl.core") \
                and not any(_is_under(module, a) for a in ALLOWED):
            bad.append((line, module))
    assert not bad, f"{path.name} imports code the references must not reuse: {bad}"


@pytest.mark.parametrize("path", _modules(), ids=lambda p: p.name)
def test_references_use_sampling_only_for_the_schedule_draws(path):
    tree = ast.parse(path.read_text(), filename=str(path))
    used = {node.attr for node in ast.walk(tree) if isinstance(node, ast.Attribute)
            and isinstance(node.value, ast.Name) and node.value.id == "sampling"}
    assert used <= SAMPLING_CALLS, used - SAMPLING_CALLS


def test_the_import_check_sees_forbidden_imports():
    src = ("from fedjax_pfl.core import local, sampling\nimport fedjax_pfl.algorithms.fedavg\n"
           "from fedjax_pfl.core.params import partition\nfrom . import naive_fedavg\n"
           "from ..algorithms import fedavg\nimportlib.import_module('fedjax_pfl.core.local')\n"
           "import fedjax_pfl.core\nfedjax_pfl.core.partial.model_partition(m, l)\n")
    found = {m for _, m in _imported(ast.parse(src), "fedjax_pfl.testing")}
    assert {"fedjax_pfl.core.local", "fedjax_pfl.algorithms.fedavg", "fedjax_pfl.core.params",
            "fedjax_pfl.testing.naive_fedavg", "fedjax_pfl.algorithms",
            "<dynamic import via import_module>",
            "fedjax_pfl.core.partial.model_partition"} <= found


@pytest.mark.parametrize("name", sorted(ALGORITHMS))
def test_reference_defaults_are_the_factory_defaults(name):
    """Each reference states the defaults it reads; they must be the factory's
    (fedavg's for the arguments a factory passes on as **kwargs)."""
    factory_defaults = {}
    for factory in (fedavg, ALGORITHMS[name]):
        for p in inspect.signature(factory).parameters.values():
            if p.kind is p.KEYWORD_ONLY:
                factory_defaults[p.name] = p.default
    for arg, value in testing.DEFAULTS[name].items():
        assert arg in factory_defaults, (name, arg)
        assert factory_defaults[arg] == value, (name, arg, factory_defaults[arg], value)


@pytest.mark.parametrize("schedule", [{"local_steps": 3}, {"local_steps": None, "local_epochs": 2}])
def test_reference_minibatches_follow_the_randomness_contract(schedule):
    """The reference's batches (re-derived from jax.random) are the package's."""
    cfg = {"batch_size": 4, **schedule}
    ref = local_reference.Schedule.of(4, cfg["local_steps"], cfg.get("local_epochs"))
    for n, rows in ((0, 9), (3, 9), (9, 9), (13, 20)):
        key = jax.random.fold_in(KEY, n)
        idx, weights = local.batch_plan(key, n, rows, batch_size=4,
                                        local_steps=cfg["local_steps"],
                                        local_epochs=ref.epochs)
        got = local_reference.minibatches(key, n, rows, ref)
        assert len(got) == idx.shape[0] == ref.num_steps(rows)
        for t, step in enumerate(got):
            valid = np.asarray(weights[t]) > 0
            np.testing.assert_array_equal(step, np.asarray(idx[t])[valid])
            if valid.any():
                np.testing.assert_allclose(np.asarray(weights[t])[valid], 1 / valid.sum())


SCHEDULES = {"steps": {"local_steps": 3}, "epochs": {"local_steps": None, "local_epochs": 2}}
_HONEST = {}


def _honest(train, schedule: str):
    """(config, initial state, package round, naive round) of FedAvg, computed once."""
    if schedule not in _HONEST:
        config = {**CONFIG, **SCHEDULES[schedule]}
        algo = fedavg(MODEL, **config)
        state = algo.init(jax.random.key(0), train)
        got = jax.jit(algo.round)(state, train, KEY)
        want = testing.naive_round("fedavg", MODEL, state, train, KEY, **config)
        _HONEST[schedule] = config, state, got, want
    return _HONEST[schedule]


def test_fedavg_equals_naive_loop_in_step_mode(tiny_train):
    """The conformance suite's fast tier compares epoch mode; this is step mode."""
    _, _, (got, got_m), (want, want_m) = _honest(tiny_train, "steps")
    testing.assert_trees_close(got, want, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(got_m["train_loss"], want_m["train_loss"], rtol=1e-5)


def _lr_times_1_5(kwargs):  # a wrong step size
    return {**kwargs, "optimizer": optax.chain(kwargs["optimizer"], optax.scale(1.5))}


def _other_order(kwargs):  # wrong minibatches (another key for the batch plan)
    return {**kwargs, "key": jax.random.fold_in(kwargs["key"], 7)}


def _one_step_more(kwargs):  # a wrong schedule
    steps, epochs = kwargs["local_steps"], kwargs["local_epochs"]
    return {**kwargs, "local_steps": steps and steps + 1, "local_epochs": epochs and epochs + 1}


@pytest.mark.parametrize("mutate, schedule", [
    (_lr_times_1_5, "steps"), (_other_order, "epochs"), (_one_step_more, "epochs")],
    ids=["lr", "order", "schedule"])
def test_a_broken_local_trainer_fails_the_conformance_check(tiny_train, monkeypatch, mutate,
                                                            schedule):
    """Were the reference to reuse `core.local`, it would inherit the bug and agree."""
    config, state, (honest, _), (want, _) = _honest(tiny_train, schedule)
    testing.assert_trees_close(honest, want, rtol=1e-5, atol=1e-5)
    original = local.local_train

    def broken(params, data, key, **kwargs):
        kwargs = mutate({**kwargs, "key": key})
        return original(params, data, kwargs.pop("key"), **kwargs)

    monkeypatch.setattr(local, "local_train", broken)
    bugged = fedavg(MODEL, **config)  # a fresh trace picks up the broken trainer
    got, _ = jax.jit(bugged.round)(state, tiny_train, KEY)
    assert not np.allclose(np.asarray(got.params["head"]["kernel"]),
                           np.asarray(honest.params["head"]["kernel"]), rtol=1e-4, atol=1e-4), \
        "the patch did not reach the round: update this test to the trainer's entry point"
    # The reference, recomputed under the patch, is untouched by it ...
    want_patched, _ = testing.naive_round("fedavg", MODEL, state, tiny_train, KEY, **config)
    testing.assert_trees_close(want_patched, want, rtol=0, atol=0)
    # ... so the conformance comparison catches the bug.
    with pytest.raises(AssertionError):
        testing.assert_trees_close(got, want_patched, rtol=1e-5, atol=1e-5)


def test_cohort_helper_is_the_package_cohort(tiny_train):
    ids, client_key = testing.common.cohort(tiny_train, KEY, 5)
    sample_key, base = sampling.round_keys(KEY)
    np.testing.assert_array_equal(ids, sampling.sample_cohort(sample_key, 11, 5))
    np.testing.assert_array_equal(jax.random.key_data(client_key), jax.random.key_data(base))
