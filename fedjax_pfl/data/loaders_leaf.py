"""Readers of naturally federated files: LEAF JSON directories and TFF/fedjax HDF5 files.

Each reader returns `(train, test, meta)`: `train` and `test` are lists of
(client id, {"x": ..., "y": ...}) pairs (test is None where the test file
holds other clients and each train client is split instead), and `meta`
holds "num_classes" and, for text, "vocab_size". `fedjax_pfl.data.load` is
the entry point.
"""

from __future__ import annotations

import collections
import glob
import os
import re

import numpy as np

from fedjax_pfl import validation
from fedjax_pfl.data.datasets import _features, _labels, leaf_users

# LEAF's models/utils/language_utils.py (github.com/TalwalkarLab/leaf): a
# character's id is its index here; characters outside it get OOV_CHAR.
ALL_LETTERS = "\n !\"&'(),-.0123456789:;>?ABCDEFGHIJKLMNOPQRSTUVWXYZ[]abcdefghijklmnopqrstuvwxyz}"
OOV_CHAR = len(ALL_LETTERS)
_CHAR_IDS = {c: i for i, c in enumerate(ALL_LETTERS)}
PAD, OOV_WORD = 0, 1  # word ids of Sent140 and StackOverflow; words start at 2
_LEAF_HINT = "expected LEAF's output of `preprocess.sh` (github.com/TalwalkarLab/leaf)"
_TFF_HINT = "expected TensorFlow Federated's HDF5 file (tff.simulation.datasets, as used by fedjax)"


def chars_to_ids(text: str) -> list[int]:
    """LEAF character ids of `text` (unknown characters: OOV_CHAR)."""
    return [_CHAR_IDS.get(c, OOV_CHAR) for c in text]


def split_words(text: str) -> list[str]:
    """LEAF's Sent140 tokenizer (`split_line`): words and the punctuation .,!?;"""
    return re.findall(r"[\w']+|[.,!?;]", text)


def build_vocab(texts, size: int) -> dict[str, int]:
    """Word -> id for the `size` most frequent words (ties by word), ids from 2 up."""
    counts = collections.Counter(w for t in texts for w in split_words(t))
    ranked = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:size]
    return {w: i + 2 for i, (w, _) in enumerate(ranked)}


def encode_words(texts, vocab: dict[str, int], seq_len: int) -> np.ndarray:
    """int32 [n, seq_len]: the first seq_len word ids (OOV_WORD if unknown), PAD after."""
    out = np.full((len(texts), seq_len), PAD, np.int32)
    for i, text in enumerate(texts):
        ids = [vocab.get(w, OOV_WORD) for w in split_words(text)[:seq_len]]
        out[i, :len(ids)] = ids
    return out


def _leaf_dir(root: str, split: str, name: str) -> list[tuple[str, dict, str]]:
    files = sorted(glob.glob(os.path.join(root, split, "*.json")))
    if not files:
        raise ValueError(f"{name}: no ROOT/{split}/*.json in {root!r}; {_LEAF_HINT}.")
    users, seen = [], {}
    for file in files:
        for user, data in leaf_users(file):
            if user in seen:
                raise validation.file_error(file, "LEAF JSON", f"user {user!r} also appears in "
                                                               f"{seen[user]!r}")
            seen[user] = file
            users.append((user, data, file))
    return users


def _check_test_users(train, test, name: str) -> None:
    known = {u for u, _, _ in train}
    for user, _, file in test:
        if user not in known:
            raise validation.file_error(file, "LEAF JSON", f"{name}: user {user!r} is in the "
                                        "test split but not in the train split")


def _convert(users, convert, name: str):
    out = []
    for user, data, file in users:
        try:
            out.append((user, convert(data)))
        except ValueError as e:
            raise validation.file_error(file, "LEAF JSON", f"user {user!r}: {e}") from None
    return out


def read_leaf(name: str, root: str, *, vocab_size: int = 10000, seq_len: int = 25):
    """LEAF's ROOT/train/*.json and ROOT/test/*.json with LEAF's own per-user split.

    femnist: x 784 floats -> [28, 28, 1], 62 classes. shakespeare: x an
    80-character string -> int32 [80] ids in ALL_LETTERS (unknown characters
    OOV_CHAR = 80), y the next character, 81 classes (80 + OOV). sent140: the
    tweet text x[4] -> int32 [seq_len] word ids (LEAF's tokenizer; vocabulary
    of the `vocab_size` most frequent words of the train split; 0 pads, 1 is
    unknown), y 0/1. leaf_synthetic: x 60 floats, classes = max label + 1.
    """
    train, test = _leaf_dir(root, "train", name), _leaf_dir(root, "test", name)
    _check_test_users(train, test, name)
    meta = {}
    if name == "femnist":
        meta["num_classes"] = 62
        convert = _femnist_x
    elif name == "shakespeare":
        meta.update(num_classes=OOV_CHAR + 1, vocab_size=OOV_CHAR + 1)
        convert = _shakespeare_xy
    elif name == "sent140":
        texts = [t for _, ts in _convert(train, _tweets, name) for t in ts]
        vocab = build_vocab(texts, validation.check_int("vocab_size", vocab_size, minimum=1))
        validation.check_int("seq_len", seq_len, minimum=1)
        meta.update(num_classes=2, vocab_size=len(vocab) + 2)

        def convert(d):
            return {"x": encode_words(_tweets(d), vocab, seq_len), "y": d["y"]}
    else:
        ys = [d["y"] for _, d, _ in train + test if len(d["y"])]
        meta["num_classes"] = max(2, int(max(y.max() for y in ys)) + 1) if ys else 2
        convert = _numeric_x
    return _convert(train, convert, name), _convert(test, convert, name), meta


def _numeric_x(d):
    if d["x"].dtype.kind != "f" or d["x"].ndim != 2:
        raise ValueError(f"expected numeric x rows [n, features], got {d['x'].dtype} "
                         f"{d['x'].shape}.")
    return d


def _femnist_x(d):
    x = d["x"]
    if x.dtype.kind != "f" or x.ndim != 2 or x.shape[1] != 784:
        raise ValueError(f"femnist: expected x of 784 floats per example, got {x.dtype} "
                         f"{x.shape}.")
    return {"x": x.reshape(-1, 28, 28, 1), "y": d["y"]}


def _shakespeare_xy(d):
    x, y = d["x"], d["y"]
    if x.dtype.kind != "U" or y.dtype.kind != "U":
        raise ValueError(f"shakespeare: expected x and y strings, got {x.dtype} and {y.dtype}.")
    if len(x) and (min(map(len, x)) != 80 or max(map(len, x)) != 80):
        raise ValueError("shakespeare: expected 80-character x strings.")
    ids = np.array([chars_to_ids(s) for s in x], np.int32).reshape(-1, 80)
    return {"x": ids, "y": np.array([_CHAR_IDS.get(c, OOV_CHAR) for c in y], np.int32)}


def _tweets(d) -> list[str]:
    x = d["x"]
    if x.ndim != 2 or x.shape[1] < 5 or x.dtype.kind != "U":
        raise ValueError(f"sent140: expected x rows of LEAF's 5 fields (text at x[4]), got "
                         f"{x.dtype} {x.shape}.")
    return [str(t) for t in x[:, 4]]


# --- TFF / fedjax HDF5 ---------------------------------------------------------------------

H5_FILES = {
    "emnist_h5": "fed_emnist", "cifar100_h5": "fed_cifar100",
    "shakespeare_h5": "shakespeare", "stackoverflow_h5": "stackoverflow",
}


def _read_h5(path: str, name: str, keys: tuple[str, ...]) -> list[tuple[str, dict]]:
    """examples/<client id>/<key> of a TFF HDF5 file, clients sorted like TFF does."""
    try:
        import h5py
    except ImportError as e:
        raise ImportError(f"{name}: h5py is needed to read HDF5 files but is not installed; "
                          "install it with: pip install 'fedjax_pfl[datasets]'") from e
    if not os.path.isfile(path):
        raise ValueError(f"{name}: no file {path!r}; {_TFF_HINT}.")
    try:
        with h5py.File(path, "r") as f:
            if "examples" not in f:
                raise validation.file_error(path, "HDF5", f"expected a group 'examples', got "
                                                          f"{sorted(f)}")
            group, clients = f["examples"], []
            for cid in sorted(group):
                missing = [k for k in keys if k not in group[cid]]
                if missing:
                    raise validation.file_error(path, "HDF5", f"client {cid!r} has no "
                                                f"{missing} (it holds {sorted(group[cid])})")
                clients.append((cid, {k: group[cid][k][()] for k in keys}))
    except OSError as e:
        problem = "the file is empty" if os.path.getsize(path) == 0 else str(e)
        raise validation.file_error(path, "HDF5", problem) from e
    return clients


def _text(values) -> list[str]:
    return [v.decode("utf-8", "replace") if isinstance(v, bytes) else str(v) for v in values]


def read_h5(name: str, root: str, *, label: str = "fine", test: str | None = None,
            vocab_size: int = 10000, seq_len: int = 20, num_tags: int = 50):
    """TFF HDF5 files ROOT/<prefix>_train.h5 and ROOT/<prefix>_test.h5.

    emnist_h5: pixels [n, 28, 28] -> x [n, 28, 28, 1] (as stored: 1 is the
    background), label, 62 classes (10 for the digits-only files, detected).
    cifar100_h5: image uint8 [n, 32, 32, 3] -> [0, 1], `label="fine"` (100) or
    "coarse" (20). shakespeare_h5: each snippet is cut into non-overlapping
    81-character pieces, x the first 80 character ids (ALL_LETTERS), y the
    81st, 81 classes. stackoverflow_h5: x the `tokens` word ids (vocabulary of
    the train file, as for sent140), y the first tag's rank among the
    `num_tags` most frequent train tags (num_tags: any other tag).

    `test="file"` pairs each train client with its namesake in the test file
    (a test-only client is an error); `test="split"` ignores the test file and
    the caller splits each train client. The default is "split" for
    cifar100_h5 (TFF's test clients are other clients) and "file" otherwise.
    """
    test = test or ("split" if name == "cifar100_h5" else "file")
    if test not in ("file", "split"):
        raise ValueError(f"test: expected 'file' or 'split', got {test!r}.")
    prefix = H5_FILES[name]
    if name == "emnist_h5" and not os.path.isfile(os.path.join(root, f"{prefix}_train.h5")):
        if os.path.isfile(os.path.join(root, "fed_emnist_digitsonly_train.h5")):
            prefix = "fed_emnist_digitsonly"
    keys = {"emnist_h5": ("pixels", "label"), "shakespeare_h5": ("snippets",),
            "stackoverflow_h5": ("tokens", "tags"),
            "cifar100_h5": ("image", "label" if label == "fine" else "coarse_label")}[name]
    if name == "cifar100_h5" and label not in ("fine", "coarse"):
        raise ValueError(f"label: expected 'fine' or 'coarse', got {label!r}.")
    paths = [os.path.join(root, f"{prefix}_{s}.h5") for s in ("train", "test")]
    splits = [_read_h5(paths[0], name, keys)]
    splits.append(_read_h5(paths[1], name, keys) if test == "file" else None)
    if test == "file":
        known = {c for c, _ in splits[0]}
        extra = [c for c, _ in splits[1] if c not in known]
        if extra:
            raise validation.file_error(paths[1], "HDF5", f"{name}: client {extra[0]!r} is in "
                                        "the test file but not in the train file (pass "
                                        "test='split' to split each train client instead)")
    meta, convert = {}, None
    if name in ("emnist_h5", "cifar100_h5"):
        meta["num_classes"] = {"fed_emnist": 62, "fed_emnist_digitsonly": 10,
                               "fed_cifar100": 100 if label == "fine" else 20}[prefix]

        def convert(d, path):
            x, y = (d["pixels"][..., None], d["label"]) if "pixels" in d else (
                d["image"], d["label" if label == "fine" else "coarse_label"])
            want = (28, 28, 1) if "pixels" in d else (32, 32, 3)
            if x.shape[1:] != want:
                raise validation.file_error(path, "HDF5", f"expected images {want}, got "
                                                          f"{x.shape[1:]}")
            x = x / 255.0 if x.dtype == np.uint8 else x
            return {"x": _features(x, path, "HDF5", name), "y": _labels(y, path, "HDF5", name)}
    elif name == "shakespeare_h5":
        meta.update(num_classes=OOV_CHAR + 1, vocab_size=OOV_CHAR + 1)

        def convert(d, path):
            ids = [chars_to_ids(s[i:i + 81]) for s in _text(d["snippets"])
                   for i in range(0, len(s) - 80, 81)]
            arr = np.array(ids, np.int32).reshape(-1, 81)
            return {"x": arr[:, :80], "y": arr[:, 80]}
    else:
        vocab = build_vocab((t for _, d in splits[0] for t in _text(d["tokens"])),
                            validation.check_int("vocab_size", vocab_size, minimum=1))
        tag_counts = collections.Counter(t.split("|")[0] for _, d in splits[0]
                                         for t in _text(d["tags"]))
        validation.check_int("num_tags", num_tags, minimum=1)
        tags = {t: i for i, (t, _) in enumerate(sorted(tag_counts.items(),
                                                       key=lambda kv: (-kv[1], kv[0]))[:num_tags])}
        meta.update(num_classes=num_tags + 1, vocab_size=len(vocab) + 2)

        def convert(d, path):
            y = [tags.get(t.split("|")[0], num_tags) for t in _text(d["tags"])]
            return {"x": encode_words(_text(d["tokens"]), vocab, seq_len),
                    "y": np.array(y, np.int32)}
    out = [None if s is None else [(c, convert(d, p)) for c, d in s]
           for s, p in zip(splits, paths)]
    return out[0], out[1], meta
