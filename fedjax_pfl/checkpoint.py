"""Checkpoints of a run with orbax: the whole state plus the run's metadata.

A checkpoint at round r holds the algorithm state (server params, optimizer
state, every per-client [M, ...] leaf, the round counter and `hparams`) and a
JSON blob: the seed and round-key data (the key schedule), the run's config,
the metric history so far, the divergence ceiling, and a fingerprint of the
state's structure and shapes. Orbax writes each step to a temporary folder
and renames it when complete, so a run killed mid-save leaves the previous
checkpoints intact; only the last `keep` are kept.

Restoring checks the fingerprint first: a checkpoint of another algorithm or
another number of clients gives a one-line error naming the folder.
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np


def fingerprint(state) -> list[str]:
    """One "path: shape dtype" line per leaf of the state's abstract structure."""
    flat, _ = jax.tree_util.tree_flatten_with_path(jax.eval_shape(lambda s: s, state))
    return [f"{jax.tree_util.keystr(p)}: {tuple(a.shape)} {a.dtype}" for p, a in flat]


class Checkpoints:
    """The checkpoints of one run, in `directory` (one sub-folder per saved round)."""

    def __init__(self, directory: str, keep: int = 3):
        import orbax.checkpoint as ocp

        self._ocp = ocp
        self.directory = os.path.abspath(os.fspath(directory))
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True)
        self.manager = ocp.CheckpointManager(self.directory, options=options,
                                             item_names=("state", "meta"))

    def latest(self) -> int | None:
        """The newest complete checkpoint's round, or None."""
        return self.manager.latest_step()

    def save(self, round_: int, state, meta: dict) -> None:
        """Saves `state` and `meta` as round `round_`, returning once it is on disk.

        Synchronous on purpose: the driver donates `state` to the next block right
        after, and a host copy on CPU may share the donated buffer.
        """
        meta = {**meta, "fingerprint": fingerprint(state)}
        args = self._ocp.args.Composite(state=self._ocp.args.StandardSave(state),
                                        meta=self._ocp.args.JsonSave(meta))
        self.manager.save(round_, args=args, force=True)
        self.manager.wait_until_finished()

    def restore(self, template, round_: int | None = None):
        """(state, meta) of round `round_` (default: the latest), shaped like `template`.

        Raises:
          ValueError: naming the checkpoint folder, when it is unreadable or was
            made by a run whose state differs from `template` (another
            algorithm, number of clients, model, ...).
        """
        round_ = self.latest() if round_ is None else round_
        if round_ is None:
            raise ValueError(f"checkpoint: no complete checkpoint in {self.directory!r}.")
        where = os.path.join(self.directory, str(round_))
        args = self._ocp.args
        try:
            meta = self.manager.restore(
                round_, args=args.Composite(meta=args.JsonRestore()))["meta"]
        except Exception as e:  # noqa: BLE001 - any orbax/IO failure is a corrupt checkpoint
            raise ValueError(f"checkpoint: cannot read {where!r}: {_one_line(e)}") from e
        want = fingerprint(template)
        got = meta.get("fingerprint") if isinstance(meta, dict) else None
        if got != want:
            diff = next((f"expected {w!r}, checkpoint has {g!r}" for w, g in zip(want, got or [])
                         if w != g), f"expected {len(want)} state leaves, checkpoint has "
                                     f"{len(got or [])}")
            raise ValueError(f"checkpoint: {where!r} was made by another run (other algorithm, "
                             f"number of clients or model): {diff}.")
        abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(np.shape(a), a.dtype), template)
        try:
            restored = self.manager.restore(
                round_, args=args.Composite(state=args.StandardRestore(abstract)))["state"]
        except Exception as e:  # noqa: BLE001
            raise ValueError(f"checkpoint: cannot read {where!r}: {_one_line(e)}") from e
        # Orbax commits every leaf to a device; leaves the template left uncommitted stay
        # so, or the resumed run would compile its round a second time.
        restored = jax.tree.map(
            lambda r, t: r if getattr(t, "committed", True) else jnp.asarray(np.asarray(r)),
            restored, template)
        return restored, meta

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def _one_line(error: Exception) -> str:
    return " ".join(str(error).split())[:300]


def save_params(path: str, params) -> None:
    """Writes model parameters to an `.npz` file, one array per "/"-joined leaf path
    (e.g. "params/head/kernel"), the format `load_params` and `--init-params` read."""
    from fedjax_pfl.core.params import path_name

    flat = jax.tree_util.tree_flatten_with_path(params)[0]
    np.savez(path, **{path_name(p): np.asarray(a) for p, a in flat})


def load_params(path: str) -> dict:
    """Model parameters from a file: `.npz` ("/"-joined leaf paths as keys, see
    `save_params`; e.g. written from PyTorch with renamed keys) or `.msgpack`
    (`flax.serialization.msgpack_serialize` of the params dict).

    Raises:
      ValueError: one line naming the file and what is wrong with it.
    """
    path = os.fspath(path)
    try:
        if path.endswith(".msgpack"):
            from flax import serialization

            with open(path, "rb") as f:
                return serialization.msgpack_restore(f.read())
        if not path.endswith(".npz"):
            raise ValueError("expected a .npz or .msgpack file")
        tree: dict = {}
        with np.load(path, allow_pickle=False) as blob:
            for name in blob.files:
                *parents, leaf = name.split("/")
                node = tree
                for part in parents:
                    node = node.setdefault(part, {})
                node[leaf] = blob[name]
        return tree
    except FileNotFoundError:
        raise ValueError(f"init_params: no file {path!r}.") from None
    except Exception as e:  # noqa: BLE001 - any parse error becomes one line naming the file
        why = str(e).rstrip(".")
        raise ValueError(f"init_params: cannot read {path!r} as parameters: {why}.") from None
