"""The driver: blocks of rounds as one jitted `lax.scan`, evaluation in between.

`simulate` runs communication rounds of an algorithm. A block of rounds is
ONE jitted call (a `lax.scan` over rounds, state donated), so no Python runs
between rounds; blocks end at every `eval_every`-th and `checkpoint_every`-th
round (counted from round 0) and at the end. After an evaluation block the
algorithm's own `evaluate` runs (also jitted) and the host summarises it.

Keys: with `base = fold_in(key(seed), 1)`, the round that starts from
`state.round == r` uses `fold_in(base, r)` and `init` uses
`fold_in(key(seed), 0)` (see `seed_keys`), so results do not depend on how
rounds are cut into blocks, and a resumed run is bit-identical to an
uninterrupted one. A given cohort schedule (`cohorts`, [R, S] client ids)
replaces the sampling: that round's cohort is `cohorts[r]`.

Diagnostics: an algorithm made with `diagnostics=True` returns per-client
arrays under `metrics["diagnostics"]`; they go to `Result.diagnostics` and
`diagnostics.jsonl`, not to the per-round means.

Health: inside the scan, a round whose mean train loss is NaN/Inf or above
`max_loss_ratio` times the first round's, or whose new server state is not
finite, is not applied (per-client [M, ...] leaves are left to the losses and
the evaluation: scanning them every round would cost a quarter of a
partial-participation round); the run stops after that block with `TrainingDiverged`, which
names the round and its value and carries the last healthy state.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
import time
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from fedjax_pfl import callbacks as callbacks_lib
from fedjax_pfl import distributed, validation
from fedjax_pfl import metrics as metrics_lib
from fedjax_pfl.core.algorithm import FederatedAlgorithm, check_same_clients
from fedjax_pfl.data.client_data import ClientData
from fedjax_pfl.results import Result, ResultsWriter, check_output

__all__ = ["Result", "TrainingDiverged", "check_cohorts", "run_rounds", "seed_keys", "simulate"]


class TrainingDiverged(FloatingPointError):
    """The run diverged; `.result` holds the run so far and the last healthy state."""

    def __init__(self, message: str, result: Result):
        super().__init__(message)
        self.result = result


def seed_keys(seed: int) -> tuple[jax.Array, jax.Array]:
    """(init key, base key of the round keys) for a run's seed."""
    key = jax.random.key(seed)
    return jax.random.fold_in(key, 0), jax.random.fold_in(key, 1)


def _one_round(round_fn, state, train, seed_key, cohorts):
    """The round that starts from `state.round`: its key and, if given, its cohort."""
    key = jax.random.fold_in(seed_key, state.round)
    if cohorts is None:
        return round_fn(state, train, key)
    return round_fn(state, train, key, cohorts[state.round])


def run_rounds(round_fn, state, train: ClientData, seed_key: jax.Array, num_rounds: int,
               cohorts: jax.Array | None = None):
    """`num_rounds` rounds as one `lax.scan`; round r uses `fold_in(seed_key, r)`
    (and the cohort `cohorts[r]` when a schedule is given, see `check_cohorts`).

    Returns:
      (state, metrics with leaves [num_rounds, ...]).
    """
    step = lambda s, _: _one_round(round_fn, s, train, seed_key, cohorts)
    return jax.lax.scan(step, state, None, length=num_rounds)


def check_cohorts(cohorts, num_rounds: int, num_clients: int) -> np.ndarray | None:
    """A cohort schedule: int [R, S], R >= `num_rounds`, each row S distinct ids in [0, M).

    Row r is the cohort of the round that starts from `state.round == r`;
    S must equal the algorithm's `clients_per_round` (M when None).
    """
    if cohorts is None:
        return None
    a = np.asarray(cohorts)
    if a.ndim != 2 or not np.issubdtype(a.dtype, np.integer) or a.shape[1] < 1:
        raise ValueError(f"cohorts: expected an int array [rounds, clients_per_round], got "
                         f"shape {a.shape} of {a.dtype}.")
    if a.shape[0] < num_rounds:
        raise ValueError(f"cohorts: expected at least {num_rounds} rows (one per round), "
                         f"got {a.shape[0]}.")
    if a.size and (a.min() < 0 or a.max() >= num_clients):
        r = int(np.argwhere((a < 0) | (a >= num_clients))[0][0])
        raise ValueError(f"cohorts: row {r} has a client id outside [0, {num_clients}): "
                         f"{a[r].tolist()}.")
    for r, row in enumerate(np.sort(a, axis=1)):
        if np.any(row[1:] == row[:-1]):
            raise ValueError(f"cohorts: row {r} repeats a client id: {a[r].tolist()}.")
    return a.astype(np.int32)


def _server_finite(tree, num_clients: int) -> jax.Array:
    """All float leaves finite, except per-client [M, ...] ones (checked through the losses
    and the evaluation: scanning them every round costs ~25% of a partial-cohort round)."""
    per_client = lambda a: a.ndim and a.shape[0] == num_clients
    leaves = [jnp.all(jnp.isfinite(a)) for a in jax.tree.leaves(tree)
              if jnp.issubdtype(a.dtype, jnp.inexact) and not per_client(a)]
    return jnp.all(jnp.stack(leaves)) if leaves else jnp.bool_(True)


def guarded_rounds(round_fn, carry, train, seed_key, ratio, num_rounds: int, cohorts=None):
    """`run_rounds` that stops applying rounds at the first unhealthy one.

    Args:
      carry: (state, ceiling, bad): the loss ceiling (inf until the first
        healthy round sets it to `ratio` times its loss) and the first
        unhealthy round (-1: none).

    Returns:
      (carry, metrics [num_rounds, ...]); rounds from `bad` on leave the state
      as it was before round `bad`.
    """
    state, ceiling, bad = carry
    start = state.round

    def body(c, i):
        state, ceiling, bad = c
        r = start + i
        new, metrics = _one_round(round_fn, state, train, seed_key, cohorts)
        loss = jnp.mean(metrics["train_loss"])
        healthy = jnp.isfinite(loss) & (loss <= ceiling) & _server_finite(new, train.num_clients)
        ok = (bad < 0) & healthy
        ceiling = jnp.where(jnp.isinf(ceiling) & ok & (loss > 0), ratio * loss, ceiling)
        bad = jnp.where((bad < 0) & ~ok, r, bad)
        return (optax.tree.where(ok, new, state), ceiling, bad), metrics

    return jax.lax.scan(body, (state, ceiling, bad), jnp.arange(num_rounds))


@functools.lru_cache(maxsize=32)
def _compiled(algorithm: FederatedAlgorithm, batched: bool):
    guarded = functools.partial(guarded_rounds, algorithm.round)
    evaluate = algorithm.evaluate
    if batched:
        single = guarded

        def guarded(carry, train, seed_key, ratio, num_rounds, cohorts=None):
            fn = functools.partial(single, num_rounds=num_rounds, cohorts=cohorts)
            return jax.vmap(fn, in_axes=(0, None, 0, None))(carry, train, seed_key, ratio)

        evaluate = jax.vmap(evaluate, in_axes=(0, None, None))
    return (jax.jit(guarded, static_argnames="num_rounds", donate_argnums=0),
            jax.jit(evaluate))


_COMPILE_EVENTS = ("/jax/core/compile/jaxpr_trace_duration",
                   "/jax/core/compile/jaxpr_to_mlir_module_duration",
                   "/jax/core/compile/backend_compile_duration")
_compile_seconds = [0.0]


def _on_event(event: str, duration: float, **_) -> None:
    if event in _COMPILE_EVENTS:
        _compile_seconds[0] += duration


jax.monitoring.register_event_duration_secs_listener(_on_event)


@contextlib.contextmanager
def _timed(seconds: dict, key: str):
    """Adds the wall time of the block to seconds[key], compile time to seconds["compile"]."""
    t0, c0 = time.perf_counter(), _compile_seconds[0]
    yield
    compile_time = _compile_seconds[0] - c0
    seconds["compile"] = seconds.get("compile", 0.0) + compile_time
    seconds[key] += time.perf_counter() - t0 - compile_time


def _own_buffers(state):
    """Copies leaves that share a buffer with an earlier leaf (donation needs distinct ones)."""
    seen = set()

    def own(a):
        if id(a) in seen:
            return jnp.copy(a)
        seen.add(id(a))
        return a

    return jax.tree.map(own, state)


def _check_args(algorithm, train, test, rounds, eval_every, checkpoint_every, max_loss_ratio):
    if not isinstance(algorithm, FederatedAlgorithm):
        raise TypeError(f"algorithm: expected a FederatedAlgorithm, "
                        f"got {type(algorithm).__name__}.")
    for name, v, lo in (("rounds", rounds, 0), ("eval_every", eval_every, 1),
                        ("checkpoint_every", checkpoint_every, 1)):
        ok = isinstance(v, int) and not isinstance(v, bool) and v >= lo
        if not ok and not (v is None and name != "rounds"):
            raise ValueError(f"{name}: expected {'' if name == 'rounds' else 'None or '}"
                             f"an int >= {lo}, got {v!r}.")
    if max_loss_ratio is not None and not (isinstance(max_loss_ratio, (int, float))
                                           and max_loss_ratio > 1):
        raise ValueError(f"max_loss_ratio: expected None or a number > 1, got {max_loss_ratio!r}.")
    if not isinstance(train, ClientData):
        raise TypeError(f"train: expected a ClientData, got {type(train).__name__}.")
    check_same_clients(train.num_clients, test, "test")


def _boundaries(done: int, target: int, eval_every, checkpoint_every):
    """The next block end after round `done`."""
    ends = [target]
    for every in (eval_every, checkpoint_every):
        if every:
            ends.append((done // every + 1) * every)
    return min(ends)


class _Run:
    """Host-side bookkeeping of one run: result, results directory, callbacks, progress."""

    def __init__(self, out, callbacks, bar):
        self.result = Result(history=[], evals=[], client_metrics={})
        self.writer = ResultsWriter(out) if out else None
        self.out = out
        self.callbacks = tuple(callbacks)
        self.bar = bar

    def rows(self, metrics, first_round: int, count: int, state) -> None:
        metrics = dict(metrics)
        diagnostics = metrics.pop("diagnostics", None)
        rows = [{"round": first_round + r, **{k: float(np.mean(v[r])) for k, v in metrics.items()}}
                for r in range(count)]
        self.result.history.extend(rows)
        if self.writer:
            self.writer.rounds(rows)
        if diagnostics is not None:
            diag = [{"round": first_round + r, **{k: np.asarray(v[r]).tolist()
                                                  for k, v in diagnostics.items()}}
                    for r in range(count)]
            self.result.diagnostics.extend(diag)
            if self.writer:
                self.writer.rounds(diag, "diagnostics.jsonl")
        callbacks_lib.call(self.callbacks, "on_block", self.result, rows, state)

    def evaluation(self, per_client, round_: int, state) -> str | None:
        """Records an evaluation; returns a divergence message if it is not finite."""
        table = metrics_lib.client_table(per_client)
        summary = {"round": round_, **metrics_lib.summarize(per_client)}
        self.result.client_metrics = table
        self.result.client_history.append((round_, table))
        self.result.evals.append(summary)
        if self.writer:
            self.writer.evaluation(summary, round_, table)
        callbacks_lib.call(self.callbacks, "on_evaluation", self.result, summary, table, state)
        if self.bar is not None:
            self.bar.set_postfix(acc=f"{summary['acc_weighted']:.4f}", refresh=False)
        if not math.isfinite(summary["loss_weighted"]):
            bad = int(np.sum(~np.isfinite(table["loss"][table["num_examples"] > 0])))
            return (f"evaluation at round {round_} gave a non-finite test loss for {bad} "
                    f"client(s); the model has diverged.")
        return None

    def end(self, state, diverged: str | None = None) -> Result:
        self.result.state = state
        self.result.diverged = diverged
        if self.bar is not None:
            self.bar.close()
        if self.writer:
            self.writer.finish(self.result)
        callbacks_lib.call(self.callbacks, "on_end", self.result)
        return self.result


def _divergence_message(metrics, start: int, bad: int, ceiling: float) -> str:
    loss = float(np.mean(metrics["train_loss"][bad - start]))
    if not math.isfinite(loss):
        what = f"the training loss became {loss}"
    elif loss > ceiling:
        what = f"the training loss {loss:.4g} exceeded max_loss_ratio x the first round's"
    else:
        what = "the state became non-finite"
    return (f"round {bad}: {what}; the result holds the state after round {bad - 1}. Lower the "
            "learning rate (client_lr) or check the data.")


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
    out: str | None = None,
    overwrite: bool = False,
    config: dict | None = None,
    checkpoint_dir: str | None = None,
    checkpoint_every: int | None = None,
    keep_checkpoints: int = 3,
    resume: bool = False,
    callbacks: Sequence[Any] = (),
    max_loss_ratio: float | None = 1e6,
    init_params: Any = None,
    cohorts: Any = None,
    mesh: Any = None,
) -> Result:
    """Runs rounds, evaluating at round 0, every `eval_every` rounds and at the end.

    Args:
      algorithm: a `FederatedAlgorithm`.
      train, test: the clients' train and test data (same M).
      rounds: rounds to run; when resuming from a checkpoint, the run's total.
      eval_every: rounds between evaluations (None: only at the end).
      seed: the run's seed (init and round keys come from `seed_keys(seed)`).
      state: start from this state instead of `algorithm.init` (it is copied,
        since blocks donate their input state).
      progress: show a progress bar on stderr.
      out: results directory written as the run goes (see `fedjax_pfl.results`);
        a non-empty one is refused unless `resume` or `overwrite`.
      overwrite: replace the results files of an existing `out`.
      config: the run's configuration, saved as `out/config.json` and in checkpoints.
      checkpoint_dir: where checkpoints go (default `out/checkpoints` when
        checkpointing with `out`).
      checkpoint_every: save a checkpoint every this many rounds (and at the end).
      keep_checkpoints: how many of the newest checkpoints to keep.
      resume: continue from the newest checkpoint in `checkpoint_dir` (a fresh
        start if there is none); the same call after a kill ends bit-identical
        to an uninterrupted run.
      callbacks: objects with `on_block` / `on_evaluation` / `on_end` (see
        `fedjax_pfl.callbacks`).
      max_loss_ratio: a round whose train loss exceeds this times the first
        round's counts as diverged (None: only NaN/Inf).
      init_params: start from these model parameters (`algorithm.init(key,
        train, params)`: checked against the model; every model copy of the
        state and the server optimizer state are built from them).
      cohorts: a cohort schedule instead of sampling: int [R, S], row r the
        client ids of the round starting from `state.round == r` (R at least
        the run's total rounds, S the algorithm's `clients_per_round`); see
        `check_cohorts`. Per-client keys stay `fold_in(round key, id)`.
      mesh: a `clients` mesh (`fedjax_pfl.client_mesh()`) for the "sharded"
        strategy: train, test and the state's per-client [M, ...] leaves are
        placed on it once (see `fedjax_pfl.distributed.place`; left as they are
        when M does not divide over its devices). With several processes
        (`fedjax_pfl.distributed`) it defaults to every process's devices and
        train/test must be global arrays (`distributed.place_clients`).

    Raises:
      TrainingDiverged: a round or an evaluation was not finite (or the loss
        exceeded the ceiling); `.result.state` is the last healthy state,
        results so far are on disk and the last good checkpoint is kept.
    """
    _check_args(algorithm, train, test, rounds, eval_every, checkpoint_every, max_loss_ratio)
    seed = validation.check_seed("seed", seed)
    if resume and state is not None:
        raise ValueError("state: give either state or resume=True, not both.")
    if out is not None:
        check_output(out, resume=resume, overwrite=overwrite)
    if checkpoint_dir is None and out is not None and (checkpoint_every or resume):
        checkpoint_dir = os.path.join(out, "checkpoints")
    if (resume or checkpoint_every) and checkpoint_dir is None:
        raise ValueError(f"{'resume' if resume else 'checkpoint_every'}: expected checkpoint_dir "
                         "or out (where the checkpoints go).")
    if checkpoint_dir is not None and jax.process_count() > 1:
        raise ValueError("checkpoint_every: checkpoints and resume are not supported with "
                         "several processes.")
    init_key, round_key = seed_keys(seed)
    if state is not None and init_params is not None:
        raise ValueError("init_params: give either state or init_params, not both.")
    if state is None:
        state = (algorithm.init(init_key, train) if init_params is None
                 else algorithm.init(init_key, train, init_params))
    else:
        state = jax.tree.map(jnp.copy, state)
    validation.check_inputs(algorithm, state, train, test)
    if mesh is None and jax.process_count() > 1:
        mesh = distributed.client_mesh()
    if mesh is not None:
        train, test, state = distributed.place((train, test, state), train.num_clients, mesh)
    state = _own_buffers(state)
    ckpt, meta = None, None
    if checkpoint_dir is not None:
        from fedjax_pfl.checkpoint import Checkpoints

        ckpt = Checkpoints(checkpoint_dir, keep_checkpoints)
        if resume and ckpt.latest() is not None:
            fresh = state
            state, meta = ckpt.restore(state)
            _check_same_run(checkpoint_dir, meta, seed, train.num_clients, fresh.hparams,
                            state.hparams)
            if meta.get("cohorts") != _digest(cohorts):
                raise ValueError(f"cohorts: the checkpoints in {checkpoint_dir!r} were made "
                                 "with another cohort schedule (or with/without one).")
    done = int(state.round)
    target = rounds if meta is not None else done + rounds
    schedule = check_cohorts(cohorts, target, train.num_clients)
    schedule = None if schedule is None else jnp.asarray(schedule)
    run = _Run(out, callbacks, _progress(target, done, progress))
    if run.writer:
        run.writer.start(config or {}, resume_round=done if meta is not None else None)
    block_fn, eval_fn = _compiled(algorithm, False)
    ceiling = jnp.float32(meta["ceiling"] if meta else np.inf)
    if mesh is not None:  # as the blocks return it (one compile)
        ceiling = distributed.place(ceiling, train.num_clients, mesh)
    ratio = jnp.float32(np.inf if max_loss_ratio is None else max_loss_ratio)

    def evaluate():
        with _timed(run.result.seconds, "eval"):
            per_client = distributed.to_host(eval_fn(state, train, test))
        return run.evaluation(per_client, int(state.round), state)

    if meta is not None:
        run.result.history, run.result.evals = meta["history"], meta["evals"]
        diverged = None
    else:
        diverged = evaluate()
    while diverged is None and done < target:
        end = _boundaries(done, target, eval_every, checkpoint_every)
        with _timed(run.result.seconds, "train"):
            (state, ceiling, bad), block_metrics = block_fn(
                (state, ceiling, jnp.int32(-1)), train, round_key, ratio, num_rounds=end - done,
                cohorts=schedule)
            block_metrics, bad = distributed.to_host((block_metrics, bad))
        if bad >= 0:
            diverged = _divergence_message(block_metrics, done + 1, int(bad) + 1, float(ceiling))
            run.rows(block_metrics, done + 1, int(bad) - done + 1, state)
            break
        run.rows(block_metrics, done + 1, end - done, state)
        if run.bar is not None:
            run.bar.update(end - done)
        done = end
        if (eval_every and done % eval_every == 0) or done == target:
            diverged = evaluate()
        if ckpt is not None and not diverged and (
                (checkpoint_every and done % checkpoint_every == 0) or done == target):
            ckpt.save(done, state, {"seed": seed, "num_clients": train.num_clients,
                                    "round_key": _key_list(round_key),
                                    "cohorts": _digest(cohorts),
                                    "ceiling": float(ceiling), "config": config or {},
                                    "history": run.result.history, "evals": run.result.evals})
    if ckpt is not None:
        ckpt.close()
    result = run.end(state, diverged)
    if diverged:
        where = f" Results so far: {out}." if out else ""
        raise TrainingDiverged(diverged + where, result)
    return result


def _check_same_run(directory, meta, seed, num_clients, want_hparams, got_hparams) -> None:
    """A resumed run must have the checkpoint's seed, clients and numeric hyperparameters."""
    if meta.get("num_clients") != num_clients:
        raise ValueError(f"train: the checkpoints in {directory!r} were made by another run with "
                         f"{meta.get('num_clients')} clients, got {num_clients}.")
    if meta.get("seed") != seed:
        raise ValueError(f"seed: the checkpoints in {directory!r} were made with seed "
                         f"{meta.get('seed')}, got {seed}.")
    for name, want in want_hparams.items():
        got = got_hparams.get(name)
        if got is None or not np.array_equal(np.asarray(want), np.asarray(got)):
            raise ValueError(f"{name}: the checkpoints in {directory!r} were made with "
                             f"{name}={np.asarray(got).tolist()}, got {np.asarray(want).tolist()}.")


def _digest(cohorts) -> str | None:
    """A fingerprint of a cohort schedule (stored in checkpoints)."""
    if cohorts is None:
        return None
    import hashlib

    return hashlib.sha256(np.ascontiguousarray(np.asarray(cohorts, np.int64))).hexdigest()[:16]


def _key_list(key) -> list[int]:
    return [int(v) for v in np.asarray(jax.random.key_data(key)).ravel()]


def _progress(total: int, initial: int, enabled: bool):
    if not enabled:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return None
    return tqdm(total=total, initial=initial, unit="round", leave=False)
