"""`simulate_grid`: P runs of one algorithm as ONE compile (vmapped over seeds and hparams)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from fedjax_pfl import validation
from fedjax_pfl.core.algorithm import FederatedAlgorithm
from fedjax_pfl.data.client_data import ClientData
from fedjax_pfl.results import Result, check_output
from fedjax_pfl.simulate import (
    _boundaries,
    _check_args,
    _compiled,
    _divergence_message,
    _progress,
    _Run,
    _timed,
    check_cohorts,
    seed_keys,
)

__all__ = ["simulate_grid"]


def simulate_grid(
    algorithm: FederatedAlgorithm,
    train: ClientData,
    test: ClientData,
    *,
    seeds: Sequence[int],
    hparams: dict[str, Sequence[float]] | None = None,
    rounds: int,
    eval_every: int | None = None,
    progress: bool = True,
    outs: Sequence[str | None] | None = None,
    configs: Sequence[dict] | None = None,
    max_loss_ratio: float | None = 1e6,
    init_params: Any = None,
    cohorts: Any = None,
) -> list[Result]:
    """P runs of one algorithm that differ only in seed and numeric hparams, as ONE compile.

    The P states are stacked on a leading axis and every block of rounds and
    every evaluation is `jax.vmap`ped over it. Point p uses seed `seeds[p]` and
    `state.hparams[k] = hparams[k][p]`. A point that diverges keeps its last
    healthy state and `result.diverged` says why; the others go on.

    Args:
      algorithm, train, test, rounds, eval_every, progress, max_loss_ratio,
        init_params, cohorts: as for `simulate` (shared by every point).
      seeds: [P] run seeds.
      hparams: name -> [P] values, overriding entries of `state.hparams`.
      outs: [P] results directories (or None entries), written as for `simulate`.
      configs: [P] configs saved as each point's config.json.

    Returns:
      P `Result`s.
    """
    _check_args(algorithm, train, test, rounds, eval_every, None, max_loss_ratio)
    seeds = [validation.check_seed(f"seeds[{p}]", s) for p, s in enumerate(seeds)]
    num = len(seeds)
    hparams = dict(hparams or {})
    outs = list(outs) if outs is not None else [None] * num
    configs = list(configs) if configs is not None else [{}] * num
    for name, values in (("outs", outs), ("configs", configs), *hparams.items()):
        if len(values) != num:
            raise ValueError(f"{name}: expected {num} values (one per seed), got {len(values)}.")
    init = (algorithm.init if init_params is None else
            lambda key, data: algorithm.init(key, data, init_params))
    states = [init(seed_keys(s)[0], train) for s in seeds]
    schedule = check_cohorts(cohorts, rounds, train.num_clients)
    schedule = None if schedule is None else jnp.asarray(schedule)
    unknown = set(hparams) - set(states[0].hparams)
    if unknown:
        raise ValueError(f"hparams: {sorted(unknown)} are not traced hyperparameters of this "
                         f"algorithm; it has {sorted(states[0].hparams)}.")
    validation.check_inputs(algorithm, states[0], train, test)
    for out in outs:
        if out is not None:
            check_output(out)
    state = jax.tree.map(lambda *xs: jnp.stack(xs), *states)
    state = state.replace(hparams={**state.hparams, **{
        k: jnp.asarray(v, jnp.float32) for k, v in hparams.items()}})
    round_keys = jnp.stack([seed_keys(s)[1] for s in seeds])
    runs = [_Run(out, (), None) for out in outs]
    for run, config in zip(runs, configs):
        if run.writer:
            run.writer.start(config)
    bar = _progress(rounds, 0, progress)
    block_fn, eval_fn = _compiled(algorithm, True)
    ceiling = jnp.full((num,), np.inf, jnp.float32)
    bad = jnp.full((num,), -1, jnp.int32)
    ratio = jnp.float32(np.inf if max_loss_ratio is None else max_loss_ratio)
    diverged: list[str | None] = [None] * num
    seconds = {"train": 0.0, "eval": 0.0}
    point = lambda tree, p: jax.tree.map(lambda a: a[p], tree)

    def evaluate():
        with _timed(seconds, "eval"):
            per_client = jax.device_get(eval_fn(state, train, test))
        for p, run in enumerate(runs):
            if diverged[p] is None:
                diverged[p] = run.evaluation(point(per_client, p), int(state.round[p]), None)

    evaluate()
    done = 0
    while done < rounds:
        end = _boundaries(done, rounds, eval_every, None)
        with _timed(seconds, "train"):
            (state, ceiling, bad), block_metrics = block_fn(
                (state, ceiling, bad), train, round_keys, ratio, num_rounds=end - done,
                cohorts=schedule)
            block_metrics, bad_host = jax.device_get((block_metrics, bad))
        for p, run in enumerate(runs):
            if diverged[p] is None:
                count = end - done if bad_host[p] < 0 else int(bad_host[p]) - done + 1
                run.rows(point(block_metrics, p), done + 1, count, None)
                if bad_host[p] >= 0:
                    diverged[p] = _divergence_message(point(block_metrics, p), done + 1,
                                                      int(bad_host[p]) + 1, float(ceiling[p]))
        if bar is not None:
            bar.update(end - done)
        done = end
        if (eval_every and done % eval_every == 0) or done == rounds:
            evaluate()
    if bar is not None:
        bar.close()
    results = []
    for p, run in enumerate(runs):
        run.result.seconds = {k: v / num for k, v in seconds.items()}
        results.append(run.end(point(state, p), diverged[p]))
    return results
