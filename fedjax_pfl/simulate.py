"""The driver: blocks of rounds as one jitted `lax.scan`, evaluation in between.

`simulate` runs `rounds` communication rounds of an algorithm. Each block of
`eval_every` rounds is ONE jitted call (a `lax.scan` over rounds, state
donated), so no Python runs between rounds; after each block the algorithm's
own `evaluate` runs (also jitted) and the host summarises it. Round r uses the
key `fold_in(key(seed), r)`, so results do not depend on the block size and a
run resumed from a saved state is identical.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from fedjax_pfl import metrics as metrics_lib
from fedjax_pfl.core.algorithm import FederatedAlgorithm, check_same_clients
from fedjax_pfl.data.client_data import ClientData


class TrainingDiverged(FloatingPointError):
    """Raised when the training loss becomes NaN/Inf; `.result` holds the run so far."""

    def __init__(self, message: str, result: Result):
        super().__init__(message)
        self.result = result


@dataclasses.dataclass
class Result:
    """What `simulate` returns.

    Attributes:
      history: one dict per round: {"round", "train_loss", ...}.
      evals: one dict per evaluation: {"round", "acc_weighted", "acc_mean", ...}.
      client_metrics: the last evaluation's per-client table ([M] arrays).
      state: the final algorithm state.
      seconds: wall time of training blocks and evaluations.
    """

    history: list[dict]
    evals: list[dict]
    client_metrics: dict[str, np.ndarray]
    state: Any = None
    seconds: dict = dataclasses.field(default_factory=lambda: {"train": 0.0, "eval": 0.0})

    def to_dataframe(self):
        """Per-round metrics joined with the evaluation summaries (pandas)."""
        import pandas as pd

        frame = pd.DataFrame(self.history, columns=["round"] + sorted(
            {k for h in self.history for k in h} - {"round"}))
        if self.evals:
            frame = frame.merge(pd.DataFrame(self.evals), on="round", how="outer")
        return frame.sort_values("round").reset_index(drop=True)

    def clients_dataframe(self):
        """The last evaluation's per-client table (pandas), one row per client."""
        import pandas as pd

        return pd.DataFrame(self.client_metrics).rename_axis("client").reset_index()

    def final(self) -> dict:
        """The last evaluation summary, with best-over-rounds accuracies."""
        if not self.evals:
            return {}
        out = dict(self.evals[-1])
        for k in ("acc_weighted", "acc_mean"):
            out[f"best_{k}"] = max(e[k] for e in self.evals)
        return out

    def to_json(self) -> str:
        return json.dumps({"history": self.history, "evals": self.evals, "final": self.final(),
                           "clients": {k: v.tolist() for k, v in self.client_metrics.items()},
                           "seconds": self.seconds}, allow_nan=True)

    def save(self, directory: str, config: dict | None = None) -> None:
        """Writes config.json, rounds.jsonl, evals.jsonl, clients.csv and summary.json."""
        os.makedirs(directory, exist_ok=True)
        if config is not None:
            _write(directory, "config.json", json.dumps(config, indent=2, default=str))
        _write(directory, "rounds.jsonl", "".join(json.dumps(h) + "\n" for h in self.history))
        _write(directory, "evals.jsonl", "".join(json.dumps(e) + "\n" for e in self.evals))
        self.clients_dataframe().to_csv(os.path.join(directory, "clients.csv"), index=False)
        _write(directory, "summary.json", json.dumps({"final": self.final(),
                                                      "seconds": self.seconds}, indent=2))


def _write(directory, name, text):
    with open(os.path.join(directory, name), "w") as f:
        f.write(text)


def run_rounds(round_fn, state, train: ClientData, seed_key: jax.Array, num_rounds: int):
    """`num_rounds` rounds as one `lax.scan`; round r uses `fold_in(seed_key, r)`.

    Returns:
      (state, metrics with leaves [num_rounds, ...]).
    """
    rounds = state.round + jnp.arange(num_rounds)
    keys = jax.vmap(jax.random.fold_in, (None, 0))(seed_key, rounds)
    return jax.lax.scan(lambda s, k: round_fn(s, train, k), state, keys)


@functools.lru_cache(maxsize=32)
def _compiled(algorithm: FederatedAlgorithm):
    block = jax.jit(functools.partial(run_rounds, algorithm.round),
                    static_argnames="num_rounds", donate_argnums=0)
    return block, jax.jit(algorithm.evaluate)


def simulate(
    algorithm: FederatedAlgorithm,
    train: ClientData,
    test: ClientData,
    *,
    rounds: int,
    eval_every: int | None = None,
    seed: int = 0,
    state: Any = None,
    progress: bool = True,
) -> Result:
    """Runs `rounds` rounds, evaluating every `eval_every` rounds (and at round 0).

    Args:
      algorithm: a `FederatedAlgorithm`.
      train, test: the clients' train and test data (same M).
      rounds: number of rounds to run.
      eval_every: rounds per jitted block (None: one block, evaluate at the end).
      seed: the run's seed (init and round keys come from `seed_keys(seed)`).
      state: resume from this state instead of calling `algorithm.init` (it is
        copied, since blocks donate their input state).
      progress: show a progress bar on stderr.

    Raises:
      TrainingDiverged: the training loss became NaN/Inf (message names the round).
    """
    if not isinstance(algorithm, FederatedAlgorithm):
        raise TypeError(f"algorithm: expected a FederatedAlgorithm, "
                        f"got {type(algorithm).__name__}.")
    for name, v, lo in (("rounds", rounds, 0), ("seed", seed, 0)):
        if not (isinstance(v, int) and not isinstance(v, bool) and v >= lo):
            raise ValueError(f"{name}: expected an int >= {lo}, got {v!r}.")
    if eval_every is not None and not (isinstance(eval_every, int) and eval_every >= 1):
        raise ValueError(f"eval_every: expected None or an int >= 1, got {eval_every!r}.")
    if not isinstance(train, ClientData):
        raise TypeError(f"train: expected a ClientData, got {type(train).__name__}.")
    check_same_clients(train.num_clients, test, "test")

    init_key, round_key = seed_keys(seed)
    if state is None:
        state = algorithm.init(init_key, train)
    else:
        state = jax.tree.map(jnp.copy, state)
    block_fn, eval_fn = _compiled(algorithm)
    result = Result(history=[], evals=[], client_metrics={})
    bar = _progress(rounds, progress)

    def evaluate():
        t0 = time.perf_counter()
        per_client = jax.device_get(eval_fn(state, train, test))
        result.seconds["eval"] += time.perf_counter() - t0
        result.client_metrics = metrics_lib.client_table(per_client)
        summary = {"round": int(state.round), **metrics_lib.summarize(per_client)}
        result.evals.append(summary)
        if bar is not None:
            bar.set_postfix(acc=f"{summary['acc_weighted']:.4f}", refresh=False)

    evaluate()
    block = eval_every or max(rounds, 1)
    done = 0
    while done < rounds:
        num = min(block, rounds - done)
        done += num
        t0 = time.perf_counter()
        start = int(state.round)
        state, block_metrics = block_fn(state, train, round_key, num_rounds=num)
        block_metrics = jax.device_get(block_metrics)
        result.seconds["train"] += time.perf_counter() - t0
        for r in range(num):
            result.history.append({"round": start + r + 1, **{
                k: float(np.asarray(v[r]).mean()) for k, v in block_metrics.items()}})
        bad = [h["round"] for h in result.history[-num:] if not np.isfinite(h["train_loss"])]
        if bad:
            result.state = state
            if bar is not None:
                bar.close()
            raise TrainingDiverged(
                f"training loss became {result.history[bad[0] - start - 1]['train_loss']} at "
                f"round {bad[0]}; lower the learning rate (client_lr) or check the data.", result)
        evaluate()
        if bar is not None:
            bar.update(num)
    if bar is not None:
        bar.close()
    result.state = state
    return result


def seed_keys(seed: int) -> tuple[jax.Array, jax.Array]:
    """(init key, base key of the round keys) for a run's seed."""
    key = jax.random.key(seed)
    return jax.random.fold_in(key, 0), jax.random.fold_in(key, 1)


def _progress(total: int, enabled: bool):
    if not enabled:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return None
    return tqdm(total=total, unit="round", leave=False)
