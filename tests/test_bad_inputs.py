"""Catalogue of bad inputs: each must be a clear one-line error, never a wrong number.

Every case asserts the exception type, that the message names the offending
argument, field or file, and that it is one line. CLI cases also assert exit
status != 0, exactly one line on stderr (no traceback) and no results files.
All errors trigger before anything compiles, so the whole file runs in seconds.

Cases marked `LEAD` need `fedjax_pfl.validation` wired into simulate.py /
cli.py (strict xfail: delete the marker once it is wired).
"""

from __future__ import annotations

import functools
import json
import math
import re
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedjax_pfl import algorithms, cli, models, simulate, testing, validation
from fedjax_pfl.algorithms import ALGORITHMS
from fedjax_pfl.data import (
    ClientData,
    dirichlet,
    federated_dataset,
    iid,
    load_csv,
    load_leaf_json,
    load_npz,
    multimodal_synthetic,
    pathological,
    quantity_skew,
    synthetic,
    train_test_split,
)

LEAD = pytest.mark.xfail(strict=True, reason="needs validation wired into simulate.py/cli.py")
KEY = jax.random.key(0)
MODEL = models.mlp((6,), 3, hidden=(8,))
RESULT_FILES = ("rounds.jsonl", "evals.jsonl", "clients.csv", "summary.json")


class Case(NamedTuple):
    id: str
    call: Any  # call(tmp_path) raises
    error: type
    match: str  # regex searched in the message (names the argument, field or file)
    marks: tuple = ()


def _params(cases):
    return [pytest.param(c, id=c.id, marks=c.marks) for c in cases]


def _assert_raises(case: Case, tmp_path):
    with pytest.raises(case.error) as info:
        case.call(tmp_path)
    message = str(info.value.args[0] if info.value.args else info.value)
    assert re.search(case.match, message), message
    assert "\n" not in message.strip(), message
    assert "Traceback" not in message


# ----------------------------------------------------------------------------- data helpers


@functools.cache
def train() -> ClientData:
    return testing.random_client_data(0, 4, max_examples=6)


@functools.cache
def heldout() -> ClientData:
    return testing.random_client_data(0, 4, sample_seed=1, max_examples=6)


def _with(data: ClientData, **fields) -> ClientData:
    return data.replace(examples={**data.examples, **fields})


def _without(data: ClientData, key: str) -> ClientData:
    return data.replace(examples={k: v for k, v in data.examples.items() if k != key})


def _counts(*values, dtype=jnp.int32) -> ClientData:
    return train().replace(num_examples=jnp.asarray(values, dtype))


def _label(value, client=1) -> ClientData:
    y = train().examples["y"]
    return _with(train(), y=y.at[client, 0].set(value))


def _init(data, model=MODEL, name="fedavg", **kwargs):
    return ALGORITHMS[name](model, **kwargs).init(KEY, data)


def _client(n=4, d=3, **fields):
    rng = np.random.default_rng(n)
    base = {"x": rng.normal(size=(n, d)).astype(np.float32),
            "y": rng.integers(0, 3, n).astype(np.int32)}
    return {**base, **fields}


def _from_clients(*clients, **kwargs):
    return ClientData.from_clients(list(clients), **kwargs)


# ----------------------------------------------------------------------------- ClientData

CLIENT_DATA = [
    Case("negative num_examples", lambda t: _init(_counts(-3, 5, 1, 1)), ValueError,
         r"train\.num_examples: expected ints in \[0, 6\].*got -3 for client 0"),
    Case("num_examples above N", lambda t: _init(_counts(7, 5, 1, 1)), ValueError,
         r"train\.num_examples.*got 7"),
    Case("float num_examples", lambda t: _init(_counts(3, 5, 1, 1, dtype=jnp.float32)),
         ValueError, r"train\.num_examples: expected a 1-D integer array"),
    Case("2-D num_examples", lambda t: _init(train().replace(
        num_examples=jnp.ones((4, 1), jnp.int32))), ValueError, r"train\.num_examples"),
    Case("all clients empty", lambda t: _init(_counts(0, 0, 0, 0)), ValueError,
         r"train\.num_examples: expected at least one example"),
    Case("leaf with wrong M", lambda t: _init(_with(train(), x=jnp.zeros((3, 6, 6)))),
         ValueError, r"train\.examples\['x'\]: expected shape \[M=4"),
    Case("leaf with another N", lambda t: _init(_with(train(), x=jnp.zeros((4, 5, 6)))),
         ValueError, r"train\.examples\['y'\]: expected N=5 rows per client \(as 'x'\)"),
    Case("1-D leaf", lambda t: _init(_with(train(), y=jnp.zeros(4, jnp.int32))), ValueError,
         r"train\.examples\['y'\]"),
    Case("string leaf", lambda t: _init(_with(train(), x=np.full((4, 6, 6), "a"))), ValueError,
         r"train\.examples\['x'\]: expected a numeric dtype"),
    Case("no fields", lambda t: _init(train().replace(examples={})), ValueError,
         r"train\.examples: expected a non-empty dict"),
    Case("not a ClientData", lambda t: _init({"x": 1}), TypeError,
         r"train: expected a ClientData, got dict"),
    Case("NaN feature", lambda t: _init(_with(train(), x=train().examples["x"].at[2, 0, 0].set(
        jnp.nan))), ValueError, r"train\.examples\['x'\]: expected finite.*client 2"),
    Case("float64 1e300 becomes inf", lambda t: _init(_with(
        train(), x=np.full((4, 6, 6), 1e300))), ValueError,
         r"train\.examples\['x'\]: expected finite values after the cast to float32"),
    Case("int64 label beyond int32", lambda t: _init(_with(
        train(), y=np.full((4, 6), 2**40, np.int64))), ValueError,
         r"train\.examples\['y'\]: expected integers that fit int32"),
    Case("validate() on a hand-built ClientData", lambda t: _counts(9, 1, 1, 1).validate("mine"),
         ValueError, r"mine\.num_examples"),
    Case("from_clients 1e300 float64", lambda t: _from_clients(
        _client(x=np.ones((4, 3))), _client(x=np.full((4, 3), 1e300))), ValueError,
         r"clients\[1\]\['x'\]: expected finite values after the cast"),
    Case("from_clients int64 labels beyond int32", lambda t: _from_clients(
        _client(y=np.full(4, 2**40, np.int64)), _client(y=np.zeros(4, np.int64))), ValueError,
         r"clients\[0\]\['y'\]: expected integers that fit int32"),
    Case("from_clients label -1 without num_classes", lambda t: _from_clients(
        _client(), _client(y=np.array([0, -1, 1, 2], np.int32))), ValueError,
         r"clients\[1\]\['y'\]: labels must lie in \[0, inf\)"),
    Case("from_clients num_classes 0", lambda t: _from_clients(_client(), num_classes=0),
         ValueError, r"num_classes: expected None or an int >= 1"),
    Case("from_clients a dict of clients", lambda t: ClientData.from_clients({"a": _client()}),
         TypeError, r"clients: expected a sequence of dicts"),
    Case("from_clients a client that is a list", lambda t: _from_clients(_client(), [1, 2]),
         TypeError, r"clients\[1\]: expected a dict"),
    Case("from_clients max_examples float", lambda t: _from_clients(_client(),
                                                                    max_examples=5.0),
         ValueError, r"max_examples: expected None or an int"),
]


@pytest.mark.parametrize("case", _params(CLIENT_DATA))
def test_client_data(case, tmp_path):
    _assert_raises(case, tmp_path)


# ----------------------------------------------------------------------------- data vs model


def _two_encoder_data():
    tr, _, _ = multimodal_synthetic(3, examples=(4, 6), seed=0)
    return tr


MODELS = [
    Case("label 7 on a 3-class model", lambda t: _init(_label(7)), ValueError,
         r"train\.examples\['y'\]: expected labels in \[0, 3\).*\[0, 7\] for client 1"),
    Case("label -1", lambda t: _init(_label(-1)), ValueError,
         r"train\.examples\['y'\].*\[-1, .*client 1"),
    Case("label == num_classes", lambda t: _init(_label(3, client=0)), ValueError,
         r"labels in \[0, 3\).*client 0"),
    Case("float labels", lambda t: _init(_with(train(), y=train().examples["y"] * 1.0)),
         ValueError, r"train\.examples\['y'\]: expected integer class labels"),
    Case("feature dim vs model", lambda t: _init(train(), model=models.mlp((5,), 3)),
         ValueError, r"train: expected examples that fit the model.*'x': \(6,\).*\(5, 64\)"),
    Case("image shape vs cnn", lambda t: _init(_with(train(), x=jnp.zeros((4, 6, 20, 20, 1))),
                                               model=models.cnn((28, 28, 1), 3)),
         ValueError, r"train: expected examples that fit the model.*\(20, 20, 1\)"),
    Case("train without y", lambda t: _init(_without(train(), "y")), ValueError,
         r"train: expected a field 'y'"),
    Case("train without x", lambda t: _init(_without(train(), "x")), ValueError,
         r"train: expected a field 'x'"),
    Case("two-encoder without x_b", lambda t: _init(_without(_two_encoder_data(), "x_b"),
                                                    model=models.two_encoder((24, 8), 6)),
         ValueError, r"train: expected a field 'x_b'"),
    Case("loss not per example", lambda t: _init(train(), model=MODEL._replace(
        loss=lambda logits, b: MODEL.loss(logits, b).sum())), ValueError,
         r"model: expected a per-example loss \[batch\], got \(\)"),
    Case("output the loss rejects", lambda t: _init(train(), model=MODEL._replace(
        apply=lambda p, b, k=None: MODEL.apply(p, b, k)[:, 0])), ValueError,
         r"train: expected examples that fit the model and its loss"),
] + [
    Case(f"{name}: init rejects label 9", functools.partial(
        lambda t, name: _init(_label(9), name=name), name=name), ValueError,
         r"train\.examples\['y'\]: expected labels in \[0, 3\)")
    for name in sorted(ALGORITHMS)
]


@pytest.mark.parametrize("case", _params(MODELS))
def test_models(case, tmp_path):
    _assert_raises(case, tmp_path)


# ----------------------------------------------------------------------------- algorithm args


def _factory(name="fedavg", **kwargs):
    return lambda t: ALGORITHMS[name](MODEL, **kwargs)


ALGORITHM_ARGS = [
    Case("local_epochs=0", _factory(local_epochs=0), ValueError,
         r"^local_epochs: expected an int >= 1, got 0\.$"),
    Case("local_steps=0", _factory(local_steps=0), ValueError,
         r"^local_steps: expected an int >= 1, got 0\.$"),
    Case("local_steps=True", _factory(local_steps=True), ValueError, r"^local_steps:"),
    Case("local_epochs=1.5", _factory(local_epochs=1.5), ValueError, r"^local_epochs:"),
    Case("local_only local_epochs=0", _factory("local", local_epochs=0), ValueError,
         r"^local_epochs: expected an int >= 1"),
    Case("fedalt personal_steps=0", _factory("fedalt", personal_steps=0), ValueError,
         r"^personal_steps: expected None or an int >= 1"),
    Case("fedrep personal_epochs=0", _factory("fedrep", personal_epochs=0), ValueError,
         r"^personal_epochs:"),
    Case("batch_size=0", _factory(batch_size=0), ValueError, r"^batch_size: expected an int"),
    Case("client_lr=inf", _factory(client_lr=math.inf), ValueError,
         r"^client_lr: expected a finite number >= 0"),
    Case("client_lr=nan", _factory(client_lr=math.nan), ValueError, r"^client_lr:"),
    Case("server_lr=-1", _factory(server_lr=-1.0), ValueError, r"^server_lr:"),
    Case("fedprox mu=nan", _factory("fedprox", mu=math.nan), ValueError, r"^mu:"),
    Case("fedavg_ft ft_lr=inf", _factory("fedavg_ft", ft_lr=math.inf), ValueError, r"^ft_lr:"),
    Case("fedavg_ft ft_seed=2**40", _factory("fedavg_ft", ft_seed=2**40), ValueError,
         r"^ft_seed: expected an int in \[0, 2\*\*32 - 1\]"),
    Case("meta_fl eval_seed=-1", _factory("meta_fl", eval_seed=-1), ValueError, r"^eval_seed:"),
    Case("ditto lam=inf", _factory("ditto", lam=math.inf), ValueError, r"^lam:"),
    Case("clients_per_round=0", _factory(clients_per_round=0), ValueError,
         r"^clients_per_round:"),
    Case("clients_per_round > M at init", lambda t: _init(train(), clients_per_round=9),
         ValueError, r"^clients_per_round: expected at most the number of clients \(4\)"),
    Case("weighting unknown", _factory(weighting="size"), ValueError, r"^weighting:"),
    Case("optimizer unknown", _factory(client_optimizer="sgdd"), ValueError,
         r"^client_optimizer: 'sgdd'"),
]


@pytest.mark.parametrize("case", _params(ALGORITHM_ARGS))
def test_algorithm_arguments(case, tmp_path):
    _assert_raises(case, tmp_path)


def test_zero_fine_tuning_steps_stay_allowed():
    """`ft_steps=0` evaluates the global model (no training is reported for it)."""
    ALGORITHMS["fedavg_ft"](MODEL, ft_steps=0)


# ----------------------------------------------------------------------------- partitioners

LABELS = np.repeat(np.arange(4), 10)

PARTITIONERS = [
    Case("iid num_clients=0", lambda t: iid(LABELS, 0), ValueError, r"^num_clients:"),
    Case("iid num_clients > N", lambda t: iid(LABELS, 41), ValueError,
         r"^num_clients: expected an int in \[1, 40\]"),
    Case("iid num_clients=2.5", lambda t: iid(LABELS, 2.5), ValueError, r"^num_clients:"),
    Case("iid seed=-1", lambda t: iid(LABELS, 2, seed=-1), ValueError, r"^seed:"),
    Case("iid 2-D labels", lambda t: iid(LABELS.reshape(4, 10), 2), ValueError, r"^labels:"),
    Case("iid empty labels", lambda t: iid([], 1), ValueError, r"^labels:"),
    Case("dirichlet alpha=nan", lambda t: dirichlet(LABELS, 4, alpha=math.nan), ValueError,
         r"^alpha: expected a finite number > 0"),
    Case("dirichlet alpha=inf", lambda t: dirichlet(LABELS, 4, alpha=math.inf), ValueError,
         r"^alpha:"),
    Case("dirichlet alpha='x'", lambda t: dirichlet(LABELS, 4, alpha="x"), ValueError,
         r"^alpha:"),
    Case("dirichlet min_samples too large", lambda t: dirichlet(LABELS, 4, alpha=1.0,
                                                                min_samples=11),
         ValueError, r"^min_samples: expected an int in \[0, 10\]"),
    Case("dirichlet max_tries=0", lambda t: dirichlet(LABELS, 4, alpha=1.0, max_tries=0),
         ValueError, r"^max_tries:"),
    Case("pathological classes_per_client=0", lambda t: pathological(
        LABELS, 4, classes_per_client=0), ValueError, r"^classes_per_client:"),
    Case("quantity_skew sigma=nan", lambda t: quantity_skew(LABELS, 4, sigma=math.nan),
         ValueError, r"^sigma:"),
    Case("quantity_skew exponent=inf", lambda t: quantity_skew(
        LABELS, 4, distribution="power_law", exponent=math.inf), ValueError, r"^exponent:"),
    Case("quantity_skew distribution", lambda t: quantity_skew(LABELS, 4, distribution="zipf"),
         ValueError, r"^distribution:"),
    Case("train_test_split fraction=1", lambda t: train_test_split([np.arange(4)],
                                                                   train_fraction=1.0),
         ValueError, r"^train_fraction: expected a finite number in \(0, 1\)"),
    Case("train_test_split fraction=nan", lambda t: train_test_split(
        [np.arange(4)], train_fraction=math.nan), ValueError, r"^train_fraction:"),
]


@pytest.mark.parametrize("case", _params(PARTITIONERS))
def test_partitioners(case, tmp_path):
    _assert_raises(case, tmp_path)


# ----------------------------------------------------------------------------- datasets


def _synthetic(**kwargs):
    return lambda t: federated_dataset("synthetic", **{"num_clients": 3, **kwargs})


DATASETS = [
    Case("synthetic alpha=nan", _synthetic(alpha=math.nan), ValueError,
         r"^alpha: expected a finite number >= 0"),
    Case("synthetic alpha=inf", _synthetic(alpha=math.inf), ValueError, r"^alpha:"),
    Case("synthetic beta=-1", _synthetic(beta=-1.0), ValueError, r"^beta:"),
    Case("synthetic num_classes=1", _synthetic(num_classes=1), ValueError, r"^num_classes:"),
    Case("synthetic num_features=0", lambda t: synthetic(1.0, 1.0, 2, num_features=0),
         ValueError, r"^num_features:"),
    Case("num_clients=0", _synthetic(num_clients=0), ValueError, r"^num_clients:"),
    Case("num_clients=2.0", _synthetic(num_clients=2.0), ValueError, r"^num_clients:"),
    Case("seed=2**70", _synthetic(seed=2**70), ValueError,
         r"^seed: expected an int in \[0, 2\*\*32 - 1\]"),
    Case("seed=-1", _synthetic(seed=-1), ValueError, r"^seed:"),
    Case("train_fraction=nan", _synthetic(train_fraction=math.nan), ValueError,
         r"^train_fraction:"),
    Case("unknown dataset", lambda t: federated_dataset("cifar", num_clients=2), ValueError,
         r"^name: unknown dataset 'cifar'"),
    Case("unknown partition", _synthetic(partition="zipf"), ValueError, r"^partition:"),
    Case("synthetic image=True", _synthetic(image=True), ValueError, r"^image:"),
    Case("unknown option", _synthetic(gamma=1.0), ValueError, r"^kwargs:.*gamma"),
    Case("digits dirichlet alpha=inf", lambda t: federated_dataset(
        "digits", num_clients=3, alpha=math.inf), ValueError, r"^alpha:"),
    Case("multimodal alpha=nan", lambda t: multimodal_synthetic(3, alpha=math.nan),
         ValueError, r"^alpha:"),
    Case("multimodal noise=inf", lambda t: multimodal_synthetic(3, noise=(1.0, math.inf)),
         ValueError, r"^noise:"),
    Case("multimodal distortion=nan", lambda t: multimodal_synthetic(3, distortion=math.nan),
         ValueError, r"^distortion:"),
    Case("multimodal seed=2**40", lambda t: multimodal_synthetic(3, seed=2**40), ValueError,
         r"^seed:"),
    Case("multimodal train_fraction=1", lambda t: multimodal_synthetic(3, train_fraction=1.0),
         ValueError, r"^train_fraction:"),
]


@pytest.mark.parametrize("case", _params(DATASETS))
def test_datasets(case, tmp_path):
    _assert_raises(case, tmp_path)


# ----------------------------------------------------------------------------- files


def _write(tmp_path, name, content) -> str:
    path = tmp_path / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    return str(path)


def _npz(tmp_path, **arrays) -> str:
    path = tmp_path / "d.npz"
    np.savez(path, **arrays)
    return str(path)


def _truncated_npz(tmp_path) -> str:
    full = _npz(tmp_path, x=np.zeros((50, 3)), y=np.zeros(50, np.int32))
    return _write(tmp_path, "cut.npz", open(full, "rb").read()[:300])


def _leaf(users, num_samples=None, **data) -> str:
    blob = {"users": users, "user_data": data or {
        u: {"x": [[0.0, 1.0]] * 2, "y": [0, 1]} for u in users}}
    if num_samples is not None:
        blob["num_samples"] = num_samples
    return json.dumps(blob)


X3, Y3 = np.zeros((3, 2), np.float32), np.zeros(3, np.int32)

FILES = [
    Case("npz empty file", lambda t: load_npz(_write(t, "e.npz", b"")), ValueError,
         r"e\.npz': invalid \.npz file: the file is empty"),
    Case("npz truncated", lambda t: load_npz(_truncated_npz(t)), ValueError,
         r"cut\.npz': invalid \.npz file"),
    Case("npz garbage", lambda t: load_npz(_write(t, "g.npz", b"hello world" * 10)),
         ValueError, r"g\.npz': invalid \.npz file: not a NumPy archive"),
    Case("npz is a .npy", lambda t: load_npz(_write(
        t, "a.npz", _npy_bytes(np.zeros(3)))), ValueError, r"a\.npz'.*single \.npy"),
    Case("npz missing key", lambda t: load_npz(_npz(t, x=X3, labels=Y3)), ValueError,
         r"^y_key: .*d\.npz' has no array 'y'"),
    Case("npz non-integer labels", lambda t: load_npz(_npz(t, x=X3, y=Y3 + 0.5)), ValueError,
         r"d\.npz'.*'y': expected integers"),
    Case("npz labels beyond int32", lambda t: load_npz(_npz(t, x=X3, y=Y3 + 1e12)),
         ValueError, r"d\.npz'.*'y': expected labels that fit int32"),
    Case("npz NaN features", lambda t: load_npz(_npz(t, x=X3 + np.nan, y=Y3)), ValueError,
         r"d\.npz'.*'x': expected finite float32 features"),
    Case("npz 1e300 float64 features", lambda t: load_npz(_npz(
        t, x=np.full((3, 2), 1e300), y=Y3)), ValueError, r"d\.npz'.*'x': expected finite"),
    Case("npz string features", lambda t: load_npz(_npz(t, x=np.full((3, 2), "a"), y=Y3)),
         ValueError, r"d\.npz'.*'x': expected numeric features"),
    Case("npz length mismatch", lambda t: load_npz(_npz(t, x=X3, y=Y3[:2])), ValueError,
         r"d\.npz'.*'x' has 3 rows but 'y' has 2"),
    Case("npz missing file", lambda t: load_npz(t / "none.npz"), FileNotFoundError,
         r"none\.npz"),
    Case("csv not UTF-8", lambda t: load_csv(_write(t, "l.csv", b"1,2\n\xff\xfe,1\n")),
         ValueError, r"l\.csv': invalid CSV file: expected UTF-8 text, got byte 0xff"),
    Case("csv label 1e12", lambda t: load_csv(_write(t, "b.csv", "1,2\n3,1e12\n")),
         ValueError, r"b\.csv'.*column -1: expected labels that fit int32"),
    Case("csv label 1.5", lambda t: load_csv(_write(t, "b.csv", "1,2\n3,1.5\n")), ValueError,
         r"b\.csv'.*column -1: expected integers"),
    Case("csv nan feature", lambda t: load_csv(_write(t, "b.csv", "nan,2\n3,1\n")), ValueError,
         r"b\.csv'.*features: expected finite"),
    Case("csv 1e300 feature", lambda t: load_csv(_write(t, "b.csv", "1e300,2\n3,1\n")),
         ValueError, r"b\.csv'.*features: expected finite"),
    Case("csv ragged rows", lambda t: load_csv(_write(t, "b.csv", "1,2,0\n3,1\n")),
         ValueError, r"b\.csv'.*rows of equal length"),
    Case("csv empty", lambda t: load_csv(_write(t, "b.csv", "")), ValueError,
         r"b\.csv'.*at least one data row"),
    Case("csv one column", lambda t: load_csv(_write(t, "b.csv", "1\n2\n")), ValueError,
         r"b\.csv'.*>= 2 columns"),
    Case("csv label_column out of range", lambda t: load_csv(
        _write(t, "b.csv", "1,2\n3,1\n"), label_column=5), ValueError, r"^label_column:"),
    Case("json empty", lambda t: load_leaf_json(_write(t, "e.json", "")), ValueError,
         r"e\.json': invalid LEAF JSON file: Expecting value"),
    Case("json truncated", lambda t: load_leaf_json(_write(t, "c.json", _leaf(["u"])[:30])),
         ValueError, r"c\.json': invalid LEAF JSON file"),
    Case("json not UTF-8", lambda t: load_leaf_json(_write(t, "n.json", b'{"users": "\xe9"}')),
         ValueError, r"n\.json': invalid LEAF JSON file: expected UTF-8"),
    Case("json short num_samples", lambda t: load_leaf_json(_write(
        t, "s.json", _leaf(["u", "v"], num_samples=[2]))), ValueError,
         r"s\.json'.*'num_samples' with one entry per user \(2\), got 1"),
    Case("json ragged x", lambda t: load_leaf_json(_write(t, "r.json", _leaf(
        ["u"], u={"x": [[0.0, 1.0], [2.0]], "y": [0, 1]}))), ValueError,
         r"r\.json'.*user 'u': expected rectangular x"),
    Case("json top-level list", lambda t: load_leaf_json(_write(t, "l.json", "[1, 2]")),
         ValueError, r"l\.json'.*expected an object"),
    Case("json missing user_data", lambda t: load_leaf_json(_write(
        t, "m.json", json.dumps({"users": ["u"]}))), ValueError, r"m\.json'.*'user_data'"),
    Case("json float labels", lambda t: load_leaf_json(_write(t, "f.json", _leaf(
        ["u"], u={"x": [[0.0], [1.0]], "y": [0.5, 1]}))), ValueError,
         r"f\.json'.*user 'u': expected integers"),
    Case("json NaN features", lambda t: load_leaf_json(_write(t, "f.json", _leaf(
        ["u"], u={"x": [[float("nan")], [1.0]], "y": [0, 1]}))), ValueError,
         r"f\.json'.*user 'u': expected finite"),
    Case("toml not UTF-8", lambda t: validation.load_toml(_write(t, "c.toml", b"a = '\xff'")),
         ValueError, r"^config: '.*c\.toml': invalid TOML file: expected UTF-8"),
    Case("toml truncated", lambda t: validation.load_toml(_write(t, "c.toml", "[run\n")),
         ValueError, r"c\.toml': invalid TOML file"),
]


def _npy_bytes(array) -> bytes:
    import io

    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


@pytest.mark.parametrize("case", _params(FILES))
def test_files(case, tmp_path):
    _assert_raises(case, tmp_path)
    assert not any(p.name.startswith("d.npz.") for p in tmp_path.iterdir())


# ----------------------------------------------------------------------------- simulate


@functools.cache
def _fedavg():
    algo = algorithms.fedavg(MODEL, local_steps=1)
    return algo, algo.init(KEY, train())


def _check_inputs(test):
    algo, state = _fedavg()
    return lambda t: validation.check_inputs(algo, state, train(), test)


def _simulate(data=None, test=None, **kwargs):
    def call(t):
        algo, _ = _fedavg()
        simulate(algo, data or train(), test or heldout(), progress=False,
                 **{"rounds": 1, **kwargs})
    return call


def _test_label(value):
    return _with(heldout(), y=heldout().examples["y"].at[2, 0].set(value))


SIMULATE = [
    Case("check_seed 2**70", lambda t: validation.check_seed("seed", 2**70), ValueError,
         r"^seed: expected an int in \[0, 2\*\*32 - 1\], got 1\.181e\+21\.$"),
    Case("check_seed -1", lambda t: validation.check_seed("seed", -1), ValueError, r"^seed:"),
    Case("check_seed True", lambda t: validation.check_seed("run_seed", True), ValueError,
         r"^run_seed:"),
    Case("check_seed 1.0", lambda t: validation.check_seed("seed", 1.0), ValueError, r"^seed:"),
    Case("check_seed '3'", lambda t: validation.check_seed("seed", "3"), ValueError, r"^seed:"),
    Case("test label 5", _check_inputs(_test_label(5)), ValueError,
         r"test\.examples\['y'\]: expected labels in \[0, 3\).*client 2"),
    Case("test label -1", _check_inputs(_test_label(-1)), ValueError,
         r"test\.examples\['y'\].*client 2"),
    Case("test without y", _check_inputs(_without(heldout(), "y")), ValueError,
         r"test: expected a field 'y'"),
    Case("test feature shape", _check_inputs(_with(heldout(), x=jnp.zeros(
        (4, heldout().max_examples, 5)))),
         ValueError, r"test\.examples\['x'\]: expected example shape \(6,\).*got \(5,\)"),
    Case("test other M", _check_inputs(heldout().take(jnp.arange(3))), ValueError,
         r"test: expected 4 clients"),
    Case("test negative num_examples", _check_inputs(heldout().replace(
        num_examples=jnp.array([-1, 1, 1, 1]))), ValueError, r"test\.num_examples"),
    Case("test NaN feature", _check_inputs(_with(heldout(), x=heldout().examples["x"] * jnp.nan)),
         ValueError, r"test\.examples\['x'\]: expected finite"),
    Case("simulate negative num_examples", _simulate(_counts(-3, 5, 1, 1)), ValueError,
         r"train\.num_examples"),
    Case("simulate rounds=-1", _simulate(rounds=-1), ValueError, r"^rounds:"),
    Case("simulate eval_every=0", _simulate(eval_every=0), ValueError, r"^eval_every:"),
    Case("simulate train not ClientData", _simulate(data={"x": 1}), TypeError, r"^train:"),
    Case("simulate seed=2**70", _simulate(seed=2**70), ValueError, r"^seed:"),
    Case("simulate test label 5", _simulate(test=_test_label(5)), ValueError,
         r"test\.examples\['y'\]"),
    Case("simulate test without y", _simulate(test=_without(heldout(), "y")), ValueError,
         r"test: expected a field 'y'"),
]


@pytest.mark.parametrize("case", _params(SIMULATE))
def test_simulate_arguments(case, tmp_path):
    _assert_raises(case, tmp_path)


@pytest.mark.parametrize("seed", [0, 1, 2**31, 2**32 - 1, np.int64(7), np.uint32(2**32 - 1)])
def test_check_seed_accepts_every_int_jax_keeps_apart(seed):
    value = validation.check_seed("seed", seed)
    assert type(value) is int and value == int(seed)
    data = np.asarray(jax.random.key_data(jax.random.key(value)))
    assert data[-1] == value  # the whole seed is in the key: distinct seeds, distinct keys
    np.random.default_rng(value)


# ----------------------------------------------------------------------------- CLI

TINY = ["--clients", "3", "--model", "logreg", "--rounds", "1", "--quiet"]


def _cli_case(id_, args, match, marks=()):
    return Case(id_, args, SystemExit, match, marks)


CLI = [
    _cli_case("synthetic --alpha nan", ["--dataset", "synthetic", "--alpha", "nan"], r"alpha:"),
    _cli_case("synthetic --alpha inf", ["--dataset", "synthetic", "--alpha", "inf"], r"alpha:"),
    _cli_case("synthetic --beta -1", ["--dataset", "synthetic", "--beta", "-1"], r"beta:"),
    _cli_case("digits --alpha inf", ["--alpha", "inf"], r"alpha:"),
    _cli_case("--seed 2**70", ["--seed", str(2**70)], r"seed: expected an int in"),
    _cli_case("--train-fraction 1.5", ["--train-fraction", "1.5"], r"train_fraction:"),
    _cli_case("--classes-per-client 0", ["--partition", "pathological",
                                         "--classes-per-client", "0"], r"classes_per_client:"),
    _cli_case("--set local_epochs=0", ["--set", "local_epochs=0"],
              r"local_epochs: expected an int >= 1, got 0"),
    _cli_case("--set local_steps=0", ["--set", "local_steps=0"], r"local_steps:"),
    _cli_case("--set client_lr=inf", ["--set", "client_lr=inf"], r"client_lr: expected a finite"),
    _cli_case("--set client_lr=nan", ["--set", "client_lr=nan"], r"client_lr:"),
    _cli_case("--set batch_size=0", ["--set", "batch_size=0"], r"batch_size:"),
    _cli_case("fedalt --set personal_steps=0", ["--algorithm", "fedalt", "--model", "mlp",
                                                "--set", "personal_steps=0"], r"personal_steps:"),
    _cli_case("fedprox --set mu=nan", ["--algorithm", "fedprox", "--set", "mu=nan"], r"mu:"),
    _cli_case("config not UTF-8", ["--config", "@bad.toml"], r"bad\.toml"),
    _cli_case("config truncated", ["--config", "@cut.toml"], r"cut\.toml"),
]


def _config_files(tmp_path):
    (tmp_path / "bad.toml").write_bytes(b"[run]\nalgorithm = '\xff'\n")
    (tmp_path / "cut.toml").write_text("[run\nalgorithm = 'fedavg'\n")


@pytest.mark.parametrize("case", _params(CLI))
def test_cli(case, tmp_path, capsys):
    _config_files(tmp_path)
    out = tmp_path / "out"
    args = [str(tmp_path / a[1:]) if a.startswith("@") else a for a in case.call]
    rc = cli.main(["run", *TINY, *args, "--out", str(out)])
    err = capsys.readouterr().err
    assert rc != 0
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("fedjax-pfl: error:"), err
    assert re.search(case.match, lines[0]), lines[0]
    assert not any((out / name).exists() for name in RESULT_FILES)


def test_catalogue_size():
    cases = CLIENT_DATA + MODELS + ALGORITHM_ARGS + PARTITIONERS + DATASETS + FILES
    assert len(cases) + len(SIMULATE) + len(CLI) >= 80
