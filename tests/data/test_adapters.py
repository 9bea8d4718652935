"""Hugging Face / Flower adapters, through stand-ins with those libraries' public interface
(neither library is installed here; the adapters use only `column_names`, `with_format`,
column access and `load_partition`)."""

import numpy as np
import pytest

import fedjax_pfl as fp


class FakeDataset:
    """The part of `datasets.Dataset` the adapter reads."""

    def __init__(self, columns):
        self._columns = columns
        self.column_names = list(columns)
        self.formatted = False

    def with_format(self, kind):
        assert kind == "numpy"
        out = FakeDataset(self._columns)
        out.formatted = True
        return out

    def __getitem__(self, name):
        assert self.formatted  # arrays come from the numpy format, not python lists
        return self._columns[name]


class FakePartitioner:
    def __init__(self, parts):
        self.parts, self.num_partitions = parts, len(parts)

    def load_partition(self, i):
        return self.parts[i]


def table(seed=0, n=23):
    rng = np.random.default_rng(seed)
    return {"writer": rng.choice(["b", "a", "c"], n), "image": rng.integers(0, 256, (n, 4, 4),
                                                                            dtype=np.uint8),
            "label": rng.integers(0, 5, n)}


def test_from_huggingface_groups_rows_by_client_in_first_appearance_order():
    cols = table()
    data = fp.data.from_huggingface(FakeDataset(cols), client_column="writer", num_classes=5)
    order = list(dict.fromkeys(cols["writer"]))
    assert data.num_clients == 3
    for i, writer in enumerate(order):
        rows = cols["writer"] == writer
        got = data.client_arrays(i)
        np.testing.assert_allclose(got["x"][..., 0], cols["image"][rows] / 255.0, rtol=1e-6)
        np.testing.assert_array_equal(got["y"], cols["label"][rows])
    assert data.examples["x"].dtype == np.float32 and data.example_shape("x") == (4, 4, 1)


def test_from_flower_one_client_per_partition():
    cols = table(1, 30)
    parts = [FakeDataset({k: v[i::3] for k, v in cols.items()}) for i in range(3)]
    data = fp.data.from_flower(FakePartitioner(parts))
    np.testing.assert_array_equal(data.num_examples, [10, 10, 10])
    np.testing.assert_array_equal(data.client_arrays(2)["y"], cols["label"][2::3])


def test_adapters_name_the_problem():
    with pytest.raises(ValueError, match=r"dataset: expected columns \['writer_id'\]"):
        fp.data.from_huggingface(FakeDataset(table()), client_column="writer_id")
    with pytest.raises(ValueError, match=r"partition 0: expected columns \['img'\]"):
        fp.data.from_flower(FakePartitioner([FakeDataset(table())]), x="img")
    with pytest.raises(TypeError, match="partitioner: expected a Flower"):
        fp.data.from_flower(object())
    with pytest.raises(ValueError, match="num_partitions: expected an int >= 1"):
        fp.data.from_flower(type("P", (), {"load_partition": lambda self, i: None})())
