"""The flat client layout: storage that grows with the data, not with M x N_max."""

import json

import jax.numpy as jnp
import numpy as np
import pytest

import fedjax_pfl as fp
from fedjax_pfl import validation
from fedjax_pfl.core.execution import Execution, map_reduce
from fedjax_pfl.data.client_data import client_capacity, client_examples, client_rows


def long_tailed(sizes=(0, 3, 1, 40, 2, 5), seed=0):
    rng = np.random.default_rng(seed)
    return [{"x": rng.normal(size=(n, 3)).astype(np.float32),
             "y": rng.integers(0, 4, n).astype(np.int32)} for n in sizes]


def test_auto_layout_is_flat_for_long_tails_and_dense_for_equal_sizes(monkeypatch):
    from fedjax_pfl.data import client_data

    assert not fp.ClientData.from_clients(long_tailed()).is_flat  # small: dense
    monkeypatch.setattr(client_data, "AUTO_FLAT_BYTES", 0)
    flat = fp.ClientData.from_clients(long_tailed())
    assert flat.is_flat and flat.stored_rows == 51 and flat.max_examples == 40
    assert flat.padding_ratio() == 0.0
    np.testing.assert_array_equal(flat.offsets, [0, 0, 3, 4, 44, 46])
    equal = fp.ClientData.from_clients(long_tailed((4, 4, 3)))
    assert not equal.is_flat and equal.stored_rows == 12


def test_client_arrays_and_layout_round_trip():
    clients = long_tailed()
    flat = fp.ClientData.from_clients(clients, layout="flat")
    dense = flat.to_layout("dense")
    assert not dense.is_flat and dense.max_examples == 40
    for i, c in enumerate(clients):
        for d in (flat, dense, dense.to_layout("flat")):
            got = d.client_arrays(i)
            for k in c:
                np.testing.assert_array_equal(got[k], c[k])


def test_take_and_pad_clients_keep_the_store():
    flat = fp.ClientData.from_clients(long_tailed(), layout="flat")
    sub = flat.take(jnp.array([3, 1]))
    assert sub.examples["x"] is flat.examples["x"]
    np.testing.assert_array_equal(sub.client_arrays(0)["y"], flat.client_arrays(3)["y"])
    more = flat.pad_clients(8)
    assert more.num_clients == 8 and int(more.num_examples[7]) == 0
    assert more.stored_rows == flat.stored_rows


def test_client_view_reads_its_rows_inside_vmap():
    flat = fp.ClientData.from_clients(long_tailed(), layout="flat")
    dense = flat.to_layout("dense")

    def rows(_, view):  # the first 5 rows of each client, and the sum of its real rows
        n = client_capacity(view)
        x = client_examples(view)["x"]
        real = jnp.arange(n) < view.num_examples
        return client_rows(view, jnp.arange(5))["y"], jnp.sum(jnp.where(real[:, None], x, 0))

    for execution in (Execution("vmap"), Execution("chunked", chunk_size=4), Execution("sharded")):
        yf, zf = map_reduce(rows, None, flat, execution)
        yd, zd = map_reduce(rows, None, dense, execution)
        real = np.arange(5)[None] < np.asarray(flat.num_examples)[:, None]
        np.testing.assert_array_equal(np.where(real, yf, 0), np.where(real, yd, 0))
        np.testing.assert_allclose(zf, zd, rtol=1e-6)


def test_flat_validation_names_the_problem():
    flat = fp.ClientData.from_clients(long_tailed(), layout="flat")
    bad = flat.replace(offsets=flat.offsets.at[4].set(50))
    with pytest.raises(ValueError, match=r"offsets: .*offset 50 with 2 examples for client 4"):
        validation.check_client_data(bad)
    x = flat.examples["x"].at[45, 1].set(jnp.nan)
    with pytest.raises(ValueError, match=r"examples\['x'\]: .* in client 4 "):
        validation.check_client_data(flat.replace(examples={**flat.examples, "x": x}))
    y = flat.examples["y"].at[0].set(9)
    with pytest.raises(ValueError, match=r"labels in \[0, 4\).*, 9\] for client 1"):
        validation.check_labels(flat.replace(examples={**flat.examples, "y": y}), 4)
    with pytest.raises(ValueError, match=r"\[0, 30\] \(capacity.*got 40 for client 3"):
        validation.check_client_data(flat.replace(capacity=30))
    with pytest.raises(ValueError, match="layout: expected one of"):
        fp.ClientData.from_clients(long_tailed(), layout="ragged")


def test_rows_of_no_client_are_not_validated():
    """Rows outside every client (e.g. after `take`) are never read: NaN there is fine."""
    flat = fp.ClientData.from_clients(long_tailed(), layout="flat").take(jnp.array([0, 1, 2]))
    x = flat.examples["x"].at[20].set(jnp.nan)
    validation.check_client_data(flat.replace(examples={**flat.examples, "x": x}))


def test_datasets_cap_and_layout_options(monkeypatch):
    from fedjax_pfl.data import client_data

    monkeypatch.setattr(client_data, "AUTO_FLAT_BYTES", 0)
    train, test, info = fp.data.federated_dataset("synthetic", num_clients=30, seed=1)
    assert train.is_flat  # Synthetic(1, 1) sizes are long-tailed
    assert train.stored_rows == int(info["train_sizes"].sum())
    capped, _, info2 = fp.data.federated_dataset("synthetic", num_clients=30, seed=1,
                                                 max_examples_per_client=8, layout="dense")
    assert not capped.is_flat and capped.max_examples <= 8
    assert info2["train_sizes"].max() + info2["test_sizes"].max() <= 16
    digits, _, info3 = fp.data.federated_dataset("digits", num_clients=4, seed=1, alpha=1.0,
                                                 max_examples_per_client=5)
    assert info3["train_sizes"].max() == 5 and digits.max_examples == 5
    with pytest.raises(ValueError, match="layout: expected one of"):
        fp.data.federated_dataset("synthetic", num_clients=3, layout="csr")
    with pytest.raises(ValueError, match="max_examples_per_client"):
        fp.data.federated_dataset("synthetic", num_clients=3, max_examples_per_client=0)


@pytest.mark.parametrize("stage_rows", [1, 4, 7, 51, 1000])
def test_store_built_through_a_small_staging_buffer(monkeypatch, stage_rows):
    from fedjax_pfl.data import client_data

    row_bytes = 3 * 4 + 4  # x: 3 float32, y: one int32
    monkeypatch.setattr(client_data, "_STAGE_BYTES", stage_rows * row_bytes)
    clients = long_tailed()
    flat = fp.ClientData.from_clients(clients, layout="flat")
    for k in ("x", "y"):
        np.testing.assert_array_equal(flat.examples[k], np.concatenate([c[k] for c in clients]))


@pytest.mark.slow
def test_cli_runs_long_tailed_synthetic_in_either_layout(tmp_path, capsys):
    """The user's path: same run, same numbers, whichever layout holds the data."""
    from fedjax_pfl import cli

    evals = {}
    for layout in ("dense", "flat"):
        out = tmp_path / layout
        rc = cli.main(["run", "--dataset", "synthetic", "--clients", "6", "--rounds", "2",
                       "--layout", layout, "--execution", "sharded",
                       "--max-examples-per-client", "60", "--out", str(out),
                       "--set", "batch_size=8", "--set", "local_epochs=1"])
        assert rc == 0, capsys.readouterr().err
        evals[layout] = [json.loads(x) for x in (out / "evals.jsonl").read_text().splitlines()]
    assert len(evals["flat"]) == len(evals["dense"]) == 2
    for a, b in zip(evals["flat"], evals["dense"]):
        assert a["acc_weighted"] == pytest.approx(b["acc_weighted"], abs=1e-6)
        assert a["loss_weighted"] == pytest.approx(b["loss_weighted"], rel=1e-5)


def test_cli_rejects_an_unknown_layout(capsys):
    from fedjax_pfl import cli

    rc = cli.main(["run", "--dataset", "synthetic", "--layout", "csr", "--rounds", "1"])
    err = capsys.readouterr().err
    assert rc != 0 and "layout: unknown layout 'csr'" in err and "Traceback" not in err
