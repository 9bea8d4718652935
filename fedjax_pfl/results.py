"""What a run produces: the in-memory `Result` and its results directory.

A results directory is written while the run goes, so a run killed at any
moment leaves valid files up to its last completed block:

* `config.json` first (the run's resolved configuration);
* `rounds.jsonl`, one line per round, appended after every block;
* `evals.jsonl`, one line per evaluation, and `clients.csv`, one row per
  client per evaluation (with a `round` column; `pandas.read_csv` reads it),
  appended after every evaluation;
* `diagnostics.jsonl`, one line per round with the per-client diagnostics of
  algorithms made with `diagnostics=True` (lists over the cohort, with its
  client ids under "clients"; `pandas.read_json(..., lines=True)` reads it);
* `summary.json` last, with `status` ("finished" or "diverged") and `final`.

Lines are strict JSON: a NaN or infinite value is written as `null` and its
key listed under `"nonfinite"`. Each append is one `write` call followed by an
`fsync`, so a killed run leaves no half-written line.
"""

from __future__ import annotations

import dataclasses
import io
import json
import math
import os
from typing import Any

import numpy as np

ROUND_FILES = ("rounds.jsonl", "evals.jsonl", "diagnostics.jsonl")
RESULT_FILES = ("config.json", *ROUND_FILES, "clients.csv", "summary.json")
OWNED = (*RESULT_FILES, "checkpoints", "tensorboard")


@dataclasses.dataclass
class Result:
    """What `simulate` returns.

    Attributes:
      history: one dict per round: {"round", "train_loss", ...}.
      evals: one dict per evaluation: {"round", "acc_weighted", "acc_mean", ...}.
      client_metrics: the last evaluation's per-client table ([M] arrays).
      client_history: every evaluation's per-client table, as (round, table).
      state: the final algorithm state (the last finite one if the run diverged).
      seconds: wall time of training blocks and evaluations.
      diverged: the divergence message, or None.
      diagnostics: one dict per round of an algorithm made with
        `diagnostics=True`: {"round", "clients": [S] ids, name: [S, ...] lists}.
    """

    history: list[dict]
    evals: list[dict]
    client_metrics: dict[str, np.ndarray]
    client_history: list[tuple[int, dict[str, np.ndarray]]] = dataclasses.field(
        default_factory=list)
    state: Any = None
    seconds: dict = dataclasses.field(default_factory=lambda: {"train": 0.0, "eval": 0.0})
    diverged: str | None = None
    diagnostics: list[dict] = dataclasses.field(default_factory=list)

    def to_dataframe(self):
        """Per-round metrics joined with the evaluation summaries (pandas)."""
        import pandas as pd

        frame = pd.DataFrame(self.history, columns=["round"] + sorted(
            {k for h in self.history for k in h} - {"round"}))
        if self.evals:
            frame = frame.merge(pd.DataFrame(self.evals), on="round", how="outer")
        return frame.sort_values("round").reset_index(drop=True)

    def clients_dataframe(self, every: bool = False):
        """Per-client table (pandas): the last evaluation, or `every` evaluation with `round`."""
        import pandas as pd

        if not every:
            return pd.DataFrame(self.client_metrics).rename_axis("client").reset_index()
        return pd.concat([client_frame(r, t) for r, t in self.client_history], ignore_index=True)

    def final(self) -> dict:
        """The last evaluation summary, with best-over-rounds accuracies."""
        if not self.evals:
            return {}
        out = dict(self.evals[-1])
        for k in ("acc_weighted", "acc_mean"):
            values = [e[k] for e in self.evals if _finite(e.get(k))]
            out[f"best_{k}"] = max(values) if values else None
        return out

    def to_json(self) -> str:
        return json.dumps(strict({"history": self.history, "evals": self.evals,
                                  "final": self.final(), "seconds": self.seconds,
                                  "diverged": self.diverged}))

    def save(self, directory: str, config: dict | None = None) -> None:
        """Writes the whole results directory at once (`simulate(out=...)` writes it as it goes)."""
        writer = ResultsWriter(directory)
        writer.start(config or {})
        writer.rounds(self.history)
        writer.rounds(self.diagnostics, "diagnostics.jsonl")
        tables = dict(self.client_history)
        for summary in self.evals:
            writer.evaluation(summary, summary["round"], tables.get(summary["round"], {}))
        writer.finish(self)


def _finite(v) -> bool:
    return isinstance(v, (int, float)) and math.isfinite(v)


def strict(value):
    """`value` with NaN/Inf floats replaced by None; dicts gain a "nonfinite" key list."""
    if isinstance(value, dict):
        bad = [k for k, v in value.items() if isinstance(v, float) and not math.isfinite(v)]
        out = {k: strict(v) for k, v in value.items()}
        if bad:
            out["nonfinite"] = bad
        return out
    if isinstance(value, (list, tuple)):
        return [strict(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def client_frame(round_: int, table: dict[str, np.ndarray]):
    import pandas as pd

    frame = pd.DataFrame(table).rename_axis("client").reset_index()
    frame.insert(0, "round", round_)
    return frame


def check_output(directory: str, *, resume: bool = False, overwrite: bool = False) -> None:
    """Refuses a non-empty results directory unless resuming or overwriting; checks writability.

    With `overwrite`, the files a run writes (and only those) are removed.

    Raises:
      ValueError: the directory exists, is not empty, and neither flag is set.
      OSError: it cannot be created or written (message names it).
    """
    directory = os.fspath(directory)
    if os.path.exists(directory) and not os.path.isdir(directory):
        raise ValueError(f"out: {directory!r} exists and is not a directory.")
    existing = os.listdir(directory) if os.path.isdir(directory) else []
    if existing and not (resume or overwrite):
        raise ValueError(f"out: {directory!r} exists and is not empty; pass resume (--resume) to "
                         "continue its run or overwrite (--overwrite) to replace it.")
    if overwrite and not resume:
        import shutil

        for name in set(existing) & set(OWNED):
            path = os.path.join(directory, name)
            shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
    try:
        os.makedirs(directory, exist_ok=True)
        probe = os.path.join(directory, ".write-test")
        with open(probe, "w") as f:
            f.write("ok")
        os.remove(probe)
    except OSError as e:
        raise OSError(f"out: cannot write to {directory!r}: {e.strerror or e}") from e


class ResultsWriter:
    """Appends a run's results to its directory as the run goes (see the module docstring)."""

    def __init__(self, directory: str):
        self.directory = os.fspath(directory)

    def _path(self, name: str) -> str:
        return os.path.join(self.directory, name)

    def _append(self, name: str, text: str) -> None:
        fd = os.open(self._path(name), os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, text.encode())
            os.fsync(fd)
        finally:
            os.close(fd)

    def _replace(self, name: str, text: str) -> None:
        tmp = self._path(name + ".tmp")
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self._path(name))

    def start(self, config: dict, resume_round: int | None = None) -> None:
        """Writes config.json (fresh run) or cuts every file back to `resume_round` (resume)."""
        os.makedirs(self.directory, exist_ok=True)
        if os.path.exists(self._path("summary.json")):
            os.remove(self._path("summary.json"))
        if resume_round is None:
            self._replace("config.json", json.dumps(strict(config), indent=2, default=str))
            for name in (*ROUND_FILES, "clients.csv"):
                self._replace(name, "")
            return
        for name in ROUND_FILES:
            kept = [line + "\n" for line in self._lines(name)
                    if _round_of(line) is not None and _round_of(line) <= resume_round]
            self._replace(name, "".join(kept))
        lines = self._lines("clients.csv")
        if lines:
            kept = [lines[0]] + [line for line in lines[1:]
                                 if line.split(",", 1)[0].isdigit()
                                 and int(line.split(",", 1)[0]) <= resume_round]
            self._replace("clients.csv", "".join(line + "\n" for line in kept))

    def _lines(self, name: str) -> list[str]:
        if not os.path.exists(self._path(name)):
            return []
        with open(self._path(name)) as f:
            return f.read().splitlines()

    def rounds(self, rows: list[dict], name: str = "rounds.jsonl") -> None:
        """Appends per-round rows to rounds.jsonl (or `name`)."""
        if rows:
            self._append(name, "".join(json.dumps(strict(r)) + "\n" for r in rows))

    def evaluation(self, summary: dict, round_: int, table: dict[str, np.ndarray]) -> None:
        """Appends an evaluation to evals.jsonl and its per-client rows to clients.csv."""
        if table:
            path = self._path("clients.csv")
            buffer = io.StringIO()
            header = not os.path.exists(path) or os.path.getsize(path) == 0
            client_frame(round_, table).to_csv(buffer, index=False, header=header)
            self._append("clients.csv", buffer.getvalue())
        self._append("evals.jsonl", json.dumps(strict(summary)) + "\n")

    def finish(self, result: Result) -> None:
        """Writes summary.json: status, final summary and timings."""
        status = "diverged" if result.diverged else "finished"
        blob = {"status": status, "final": result.final(), "seconds": result.seconds}
        if result.diverged:
            blob["diverged"] = result.diverged
        self._replace("summary.json", json.dumps(strict(blob), indent=2))


def _round_of(line: str) -> int | None:
    try:
        return int(json.loads(line)["round"])
    except (ValueError, KeyError, TypeError):
        return None
