"""Labelling parameters as personal or shared by tree path; split and merge.

Partial-personalization methods (FedAlt, FedSim, FedRep, FedPer, FedAPM) keep
some parameters per client (personal, v_i) and average the rest (shared, u).
A `Partition` is built once from a params pytree (or its shapes) and a label:

* a sequence of top-level module names, e.g. `("head",)` or
  `("encoder_a", "encoder_b")`;
* a regular expression (a `str`), searched in the "/"-joined path of each leaf,
  e.g. `r"^head/"` or `"kernel$"`;
* a predicate `fn(path: str) -> bool`.

`split(params) -> (personal, shared)` returns two flat dicts `{path: leaf}`
(valid pytrees, so they stack, vmap and differentiate like params), and
`merge(personal, shared)` rebuilds the original tree. Both are pure and work
on stacked [M, ...] leaves as well.

Example:
  >>> part = partition(model.init(key), ("head",))
  >>> v, u = part.split(params)          # v: {"head/bias", "head/kernel"}
  >>> params = part.merge(v, u)
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Sequence

import jax

Label = Sequence[str] | str | Callable[[str], bool]


def path_name(path) -> str:
    """"/"-joined name of a `jax.tree_util` key path, e.g. "hidden_0/kernel"."""
    parts = []
    for k in path:
        for attr in ("key", "name", "idx"):
            if hasattr(k, attr):
                parts.append(str(getattr(k, attr)))
                break
        else:
            parts.append(str(k))
    return "/".join(parts)


def _predicate(label: Label, name: str) -> Callable[[str], bool]:
    if isinstance(label, str):
        try:
            pattern = re.compile(label)
        except re.error as e:
            raise ValueError(f"{name}: {label!r} is not a valid regular expression: {e}.") from e
        return lambda path: pattern.search(path) is not None
    if callable(label):
        return lambda path: bool(label(path))
    if isinstance(label, Sequence) and label and all(isinstance(s, str) for s in label):
        names = frozenset(label)
        return lambda path: path.split("/", 1)[0] in names
    raise ValueError(f"{name}: expected a non-empty sequence of top-level module names, a regex "
                     f"string or a predicate on paths, got {label!r}.")


@dataclasses.dataclass(frozen=True)
class Partition:
    """Which leaves of a params tree are personal (static; hashable).

    Attributes:
      treedef: the params tree structure.
      paths: every leaf's "/"-joined path, in tree-flatten order.
      personal: per leaf, True when personal.
    """

    treedef: object
    paths: tuple[str, ...]
    personal: tuple[bool, ...]

    @property
    def personal_paths(self) -> tuple[str, ...]:
        return tuple(p for p, m in zip(self.paths, self.personal) if m)

    @property
    def shared_paths(self) -> tuple[str, ...]:
        return tuple(p for p, m in zip(self.paths, self.personal) if not m)

    def split(self, params) -> tuple[dict, dict]:
        """(personal, shared): two flat dicts `{path: leaf}` of `params`' leaves."""
        leaves = self.treedef.flatten_up_to(params)
        v = {p: a for p, m, a in zip(self.paths, self.personal, leaves) if m}
        u = {p: a for p, m, a in zip(self.paths, self.personal, leaves) if not m}
        return v, u

    def merge(self, personal: dict, shared: dict):
        """The params tree with leaves taken from `personal` and `shared`."""
        leaves = [personal[p] if m else shared[p] for p, m in zip(self.paths, self.personal)]
        return jax.tree.unflatten(self.treedef, leaves)

    def labels(self):
        """The params tree with a bool per leaf (True = personal)."""
        return jax.tree.unflatten(self.treedef, list(self.personal))


def partition(params, personal: Label, *, name: str = "personal",
              require_personal: bool = True, require_shared: bool = True) -> Partition:
    """Labels the leaves of `params` as personal or shared.

    Args:
      params: a params pytree (arrays or `jax.ShapeDtypeStruct`s) of ONE model.
      personal: top-level module names, a regex on leaf paths, or a predicate.
      name: the argument name used in error messages.
      require_personal: raise if nothing is personal.
      require_shared: raise if everything is personal.

    Returns:
      A `Partition`.

    Raises:
      ValueError: naming `name`, for a malformed label, a label that matches
        no parameter, or one that matches every parameter when a shared part
        is needed. The message lists the available paths.
    """
    predicate = _predicate(personal, name)
    flat, treedef = jax.tree_util.tree_flatten_with_path(params)
    if not flat:
        raise ValueError("params: expected a pytree with at least one array, got none.")
    paths = tuple(path_name(p) for p, _ in flat)
    mask = tuple(predicate(p) for p in paths)
    top = sorted({p.split("/", 1)[0] for p in paths})
    if require_personal and not any(mask):
        raise ValueError(f"{name}: {personal!r} matches no parameter; top-level names are {top}, "
                         f"paths are {list(paths)}.")
    if require_shared and all(mask):
        raise ValueError(f"{name}: {personal!r} matches every parameter, leaving no shared part; "
                         f"top-level names are {top}.")
    return Partition(treedef, paths, mask)


def num_elements(tree) -> int:
    """Number of scalars in a pytree (arrays or shape structs)."""
    total = 0
    for a in jax.tree.leaves(tree):
        size = 1
        for d in a.shape:
            size *= d
        total += size
    return total
