"""Callbacks that `simulate` calls between blocks, and a TensorBoard writer.

A callback is any object with some of these methods (missing ones are
skipped); they run on the host between jitted blocks, never inside one:

* `on_block(result, rows, state)`: after each block of rounds; `rows` are the
  block's per-round metric dicts (also appended to `result.history`);
* `on_evaluation(result, summary, table, state)`: after each evaluation;
  `summary` is the host summary, `table` the per-client [M] arrays;
* `on_end(result)`: once, when the run finishes or diverges.

Example:
  >>> class PrintAccuracy:
  ...     def on_evaluation(self, result, summary, table, state):
  ...         print(summary["round"], summary["acc_weighted"])
  >>> fp.simulate(algo, train, test, rounds=10, callbacks=[PrintAccuracy()])
"""

from __future__ import annotations

import math
import os
from typing import Any, Protocol


class Callback(Protocol):
    """The callback protocol (every method optional)."""

    def on_block(self, result, rows: list[dict], state: Any) -> None: ...

    def on_evaluation(self, result, summary: dict, table: dict, state: Any) -> None: ...

    def on_end(self, result) -> None: ...


def call(callbacks, method: str, *args) -> None:
    """Calls `method` on every callback that has it."""
    for callback in callbacks:
        fn = getattr(callback, method, None)
        if fn is not None:
            fn(*args)


class TensorBoard:
    """Writes round metrics (`train/<name>`) and evaluation summaries (`eval/<name>`).

    Needs the `tensorboard` extra (`pip install 'fedjax_pfl[tensorboard]'`,
    which brings tensorboardX). View with `tensorboard --logdir DIR`.

    Args:
      logdir: the event-file folder (e.g. `<results>/tensorboard`).
    """

    def __init__(self, logdir: str):
        try:
            from tensorboardX import SummaryWriter
        except ImportError as e:
            raise ImportError("tensorboard: tensorboardX is not installed; install the extra "
                              "with: pip install 'fedjax_pfl[tensorboard]'") from e
        os.makedirs(logdir, exist_ok=True)
        self.writer = SummaryWriter(logdir=os.fspath(logdir))

    def _scalars(self, prefix: str, row: dict) -> None:
        step = int(row["round"])
        for key, value in row.items():
            if key != "round" and isinstance(value, (int, float)) and math.isfinite(value):
                self.writer.add_scalar(f"{prefix}/{key}", value, step)

    def on_block(self, result, rows, state) -> None:
        del result, state
        for row in rows:
            self._scalars("train", row)
        self.writer.flush()

    def on_evaluation(self, result, summary, table, state) -> None:
        del result, table, state
        self._scalars("eval", summary)
        self.writer.flush()

    def on_end(self, result) -> None:
        del result
        self.writer.close()
