"""Sweeps: a grid of runs, vmapped wherever only numbers differ.

A sweep is the cartesian product of `grid` (key -> list of values). A key is a
run option (the names of `fedjax-pfl run`'s [run] table: algorithm, dataset,
clients, partition, seed, rounds, ...) or a keyword argument of the algorithm
factories (client_lr, mu, local_epochs, ...). The rules:

* Algorithm keywords (swept in `grid` or fixed in `algorithm_kwargs`) go to the
  algorithms of the sweep that accept them (`cli.accepted_kwargs`); points of
  the other algorithms are not multiplied by a swept keyword. A keyword that is
  off (None) by default in an algorithm and on in a variant of it (a config
  subclass: fedprox's `mu` against fedavg's) is not passed to the former, which
  it would turn into the variant. A keyword no algorithm takes is an error.
* `seed` is the run seed (init and round keys). The data split uses `data_seed`
  (a run option, default 0), so points that differ only in `seed` share data.
* Points that differ only in `seed` and in numeric keywords the algorithm keeps
  in `state.hparams` form a group that runs as ONE vmapped compile
  (`simulate_grid`). Groups (other algorithm, data, client count, structural
  keywords such as local_epochs or num_models) run one after another. Data is
  built once per (dataset, clients, partition, data_seed, ...) and kept.

`out` receives sweep.json (the resolved spec), points/<id>/ (one results
directory per point), table.csv (one row per point) and plots/. Re-running the
same spec in the same `out` skips the groups whose points all have a
summary.json with status "finished" or "diverged"; a different spec is refused.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import os
import re
import shutil
import sys

from fedjax_pfl import cli

# Run options that may vary per point (given init params and cohorts: `run` and `simulate` only).
OPTIONS = set(cli.RUN_OPTIONS) - {"out", "devices", "init_params", "cohorts"}
NAMED = ("algorithm", "dataset", "clients", "partition", "seed")  # always in ids and tables
DATA = ("dataset", "clients", "partition", "data_seed", "train_fraction", "alpha", "beta",
        "classes_per_client")
METRICS = ("acc_weighted", "acc_mean", "acc_min", "loss_weighted", "best_acc_weighted")
OWNED = ("sweep.json", "points", "table.csv", "plots")
DONE = ("finished", "diverged")


@dataclasses.dataclass
class Point:
    """One run of a sweep.

    Attributes:
      run: its run options (every name of `cli.RUN_OPTIONS`, dataset defaults filled).
      kwargs: its algorithm factory keyword arguments.
      grid: the value it takes for each grid key (None: its algorithm does not take it).
    """

    run: dict
    kwargs: dict
    grid: dict

    @property
    def id(self) -> str:
        """A readable name plus an 8-character hash of the point's full configuration."""
        parts = [self.run["algorithm"], self.run["dataset"], f"M{self.run['clients']}",
                 self.run["partition"], f"seed{self.run['seed']}"]
        parts += [f"{k}{v}" for k, v in self.grid.items() if k not in NAMED and v is not None]
        name = re.sub(r"[^A-Za-z0-9._=-]+", "_", "-".join(map(str, parts)))[:80]
        blob = json.dumps([self.run, self.kwargs], sort_keys=True, default=str)
        return f"{name}-{hashlib.sha1(blob.encode()).hexdigest()[:8]}"


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _targets(key: str, algorithms: list[str]) -> set[str]:
    """The algorithms of the sweep that get keyword `key` (see the module docstring)."""
    import fedjax_pfl as fp

    takers = {a for a in algorithms if key in cli.accepted_kwargs(fp.ALGORITHMS[a])}
    if not takers:
        raise ValueError(f"{key}: expected a run option or a keyword of {algorithms}, got a key "
                         f"none of them accepts.")
    field = lambda a: fp.ALGORITHMS[a].config.__dataclass_fields__.get(key)
    variant = lambda b, a: (b != a and issubclass(fp.ALGORITHMS[b].config, fp.ALGORITHMS[a].config)
                            and field(b) is not None and field(b).default is not None)
    return {a for a in takers
            if field(a) is None or field(a).default is not None
            or not any(variant(b, a) for b in takers)}


def expand_grid(grid: dict, base: dict | None = None,
                algorithm_kwargs: dict | None = None) -> list[Point]:
    """The sweep's points in grid order, validated (nothing is built or compiled).

    Raises:
      ValueError: a bad key or value (one line that names it).
    """
    import fedjax_pfl as fp

    base, fixed = dict(base or {}), dict(algorithm_kwargs or {})
    if not isinstance(grid, dict) or not grid:
        raise ValueError(f"grid: expected a non-empty table of lists, got {grid!r}.")
    for key, values in grid.items():
        if not isinstance(values, list) or not values:
            raise ValueError(f"{key}: expected a non-empty list of values, got {values!r}.")
        if key in ("out", "devices"):
            raise ValueError(f"{key}: expected in the [sweep] table (one per sweep), got a list.")
        if key in base or key in fixed:
            raise ValueError(f"{key}: expected in one table, got it in [grid] and another.")
    for key in sorted(set(base) - OPTIONS):
        raise ValueError(f"{key}: expected a run option {sorted(OPTIONS)}, got an unknown key.")
    defaults = {k: spec[1] for k, spec in cli.RUN_OPTIONS.items()} | {"data_seed": 0} | base
    algorithms = list(dict.fromkeys(grid.get("algorithm", [defaults["algorithm"]])))
    for name in algorithms:
        if name not in fp.ALGORITHMS:
            raise ValueError(f"algorithm: unknown algorithm {name!r}; expected one of "
                             f"{sorted(fp.ALGORITHMS)}.")
    targets = {k: _targets(k, algorithms) for k in [*fixed, *grid] if k not in OPTIONS}
    points, seen = [], set()
    for values in itertools.product(*grid.values()):
        chosen = dict(zip(grid, values))
        run = defaults | {k: v for k, v in chosen.items() if k in OPTIONS}
        kwargs = {k: v for k, v in (fixed | chosen).items()
                  if k in targets and run["algorithm"] in targets[k]}
        key = json.dumps([run, kwargs], sort_keys=True, default=str)
        if key in seen:
            continue
        seen.add(key)
        cli._check_options(run)
        cli._dataset_kwargs(run)
        cli._algorithm_kwargs(run, kwargs)
        grid_values = {k: v if k in OPTIONS or k in kwargs else None for k, v in chosen.items()}
        points.append(Point(run, kwargs, grid_values))
    return points


def group_points(points: list[Point], traced) -> list[list[Point]]:
    """Splits points into groups that can share one vmapped compile (first-appearance order).

    Args:
      points: the sweep's points.
      traced: `point -> set of names` its algorithm keeps in `state.hparams`.

    Returns:
      Groups whose points differ only in `seed` and numeric traced keywords.
    """
    groups: dict[str, list[Point]] = {}
    for p in points:
        names = traced(p)
        static = {k: v for k, v in p.kwargs.items() if not (k in names and _number(v))}
        run = {k: v for k, v in p.run.items() if k != "seed"}
        key = json.dumps([run, static, sorted(p.kwargs)], sort_keys=True, default=str)
        groups.setdefault(key, []).append(p)
    return list(groups.values())


def sweep(grid: dict, *, base: dict | None = None, algorithm_kwargs: dict | None = None,
          out: str, progress: bool = True, overwrite: bool = False):
    """Runs every point of a grid (vmapped groups where possible) and tabulates them.

    Args:
      grid: key -> non-empty list of values; the sweep is their cartesian product.
      base: run options shared by every point (like `run`'s [run] table, plus `devices`).
      algorithm_kwargs: fixed algorithm keyword arguments (like `run --set`).
      out: the sweep directory (see the module docstring).
      progress: show each group's round progress bar (one line per group is always
        printed on stderr).
      overwrite: replace a different sweep found in `out`.

    Returns:
      The table (pandas DataFrame), one row per point, as written to out/table.csv.
    """
    import jax

    import fedjax_pfl as fp
    from fedjax_pfl.grid import simulate_grid
    from fedjax_pfl.simulate import simulate

    base = dict(base or {})
    devices = base.pop("devices", None)
    points = expand_grid(grid, base, algorithm_kwargs)
    defaults = {k: spec[1] for k, spec in cli.RUN_OPTIONS.items()} | {"data_seed": 0} | base
    spec = {"sweep": {k: defaults[k] for k in sorted(OPTIONS - set(grid))} | {"devices": devices},
            "grid": grid, "algorithm": dict(algorithm_kwargs or {})}
    if devices:
        try:
            fp.use_cpu_devices(devices)
        except RuntimeError as e:
            raise RuntimeError(f"devices: JAX is already initialised in this process ({e})") from e
    data, built = {}, {}
    for p in points:  # builds data and algorithms, validating every value before any compile
        image = p.run["model"] in cli.IMAGE_MODELS
        dkey = json.dumps([p.run[k] for k in DATA] + [image], default=str)
        if dkey not in data:
            data[dkey] = cli._load_data(dict(p.run))
        algorithm, train, _, info = cli._build({**p.run, "devices": None}, p.kwargs, data[dkey])
        names = set(jax.eval_shape(algorithm.init, jax.random.key(0), train).hparams)
        built[p.id] = (algorithm, names, info, data[dkey])
    _prepare(out, json.loads(json.dumps(spec, default=str)), overwrite)
    groups = group_points(points, lambda p: built[p.id][1])
    group_of = {p.id: g for g, group in enumerate(groups) for p in group}
    for g, group in enumerate(groups):
        dirs = [os.path.join(out, "points", p.id) for p in group]
        run = group[0].run
        line = f"[{g + 1}/{len(groups)}] {run['algorithm']} {run['dataset']} M={run['clients']} "
        line += f"({len(group)} points, vmapped)" if len(group) > 1 else f"({group[0].id})"
        if all(_summary(d).get("status") in DONE for d in dirs):
            print(f"{line}: done, skipped", file=sys.stderr, flush=True)
            continue
        print(f"{line} ...", file=sys.stderr, flush=True)
        for d in dirs:
            shutil.rmtree(d, ignore_errors=True)
        algorithm, _, info, (train, test, _) = built[group[0].id]
        configs = [cli._run_config(p.run, p.kwargs, info, d) | {
            "sweep": {"id": p.id, "grid": p.grid, "group": g}} for p, d in zip(group, dirs)]
        common = dict(rounds=run["rounds"], eval_every=run["eval_every"], progress=progress)
        if len(group) == 1:
            try:
                simulate(algorithm, train, test, seed=run["seed"], out=dirs[0],
                         config=configs[0], **common)
            except fp.TrainingDiverged as e:
                print(f"  diverged: {e}", file=sys.stderr)
            continue
        # Every hparam of every point: some are derived from others at build time
        # (ditto's personal_lr defaults to client_lr).
        values = [jax.device_get(built[p.id][0].init(jax.random.key(0), train).hparams)
                  for p in group]
        results = simulate_grid(algorithm, train, test, seeds=[p.run["seed"] for p in group],
                                hparams={k: [v[k] for v in values] for k in values[0]},
                                outs=dirs, configs=configs, **common)
        for p, r in zip(group, results):
            if r.diverged:
                print(f"  {p.id} diverged: {r.diverged}", file=sys.stderr)
    frame = _table(points, group_of, out)
    _plots(frame, points, out)
    return frame


def _prepare(out: str, spec: dict, overwrite: bool) -> None:
    """Refuses an `out` holding something else than this spec's sweep, unless overwriting."""
    path = os.path.join(out, "sweep.json")
    existing = os.listdir(out) if os.path.isdir(out) else []
    saved = _read_json(path)
    if existing and saved != spec:
        if not overwrite:
            what = "a different sweep" if saved is not None else "files of no sweep"
            raise ValueError(f"out: expected a new directory or one holding this sweep, got "
                             f"{out!r} with {what}; pass overwrite=True (--overwrite).")
        for name in set(existing) & set(OWNED):
            target = os.path.join(out, name)
            shutil.rmtree(target) if os.path.isdir(target) else os.remove(target)
    os.makedirs(os.path.join(out, "points"), exist_ok=True)
    with open(path, "w") as f:
        json.dump(spec, f, indent=2)


def _read_json(path: str):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):  # missing, or cut short by a kill
        return None


def _summary(directory: str) -> dict:
    return _read_json(os.path.join(directory, "summary.json")) or {}


def _jsonl(path: str) -> list[dict]:
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def _table(points: list[Point], group_of: dict, out: str):
    """One row per point from the point directories; also written to out/table.csv."""
    import pandas as pd

    rows = []
    for p in points:
        d = os.path.join(out, "points", p.id)
        summary = _summary(d)
        final, secs = summary.get("final") or {}, summary.get("seconds") or {}
        done = len(_jsonl(os.path.join(d, "rounds.jsonl")))
        rows.append({"id": p.id, **{k: p.run[k] for k in NAMED}, **p.grid,
                     "status": summary.get("status", "missing"),
                     **{k: final.get(k) for k in METRICS},
                     "seconds_per_round": secs["train"] / done if secs and done else None,
                     "compile_seconds": secs.get("compile"),
                     "wall_seconds": sum(secs.values()) if secs else None,
                     "group": group_of[p.id], "dir": os.path.join("points", p.id)})
    frame = pd.DataFrame(rows)
    frame.to_csv(os.path.join(out, "table.csv"), index=False)
    return frame


def _plots(frame, points: list[Point], out: str) -> None:
    """Accuracy and round time vs client count, accuracy vs each swept number, curves."""
    try:
        from matplotlib.figure import Figure  # Agg canvas; pyplot's global state untouched
    except ImportError:
        print("sweep: matplotlib is not installed; no plots (pip install 'fedjax_pfl[plot]').",
              file=sys.stderr)
        return
    import pandas as pd

    os.makedirs(os.path.join(out, "plots"), exist_ok=True)

    def save(name, title, xlabel, ylabel, lines, logx=False):
        fig = Figure(figsize=(6, 4), layout="constrained")
        ax = fig.subplots()
        for label, (xs, ys) in lines.items():
            ax.plot(xs, ys, marker="o", label=label)
        ax.set(title=title, xlabel=xlabel, ylabel=ylabel, xscale="log" if logx else "linear")
        ax.grid(alpha=0.3)
        if 0 < len(lines) <= 12:
            ax.legend(fontsize="small")
        fig.savefig(os.path.join(out, "plots", name), dpi=120)

    def by_algorithm(rows, x, y):
        means = rows.groupby(["algorithm", x], dropna=False)[y].mean().reset_index()
        return {a: (m[x].tolist(), m[y].tolist()) for a, m in means.groupby("algorithm")}

    ok = frame[frame["status"] == "finished"]
    rest = [c for c in frame.columns[1:frame.columns.get_loc("status")]
            if c not in ("algorithm", "clients", "seed")]
    ok = ok.assign(setting=[str(tuple(r)) for r in ok[rest].itertuples(index=False)])
    best = ok.groupby(["algorithm", "clients", "setting"])["acc_weighted"].mean().reset_index()
    best = best.groupby(["algorithm", "clients"])["acc_weighted"].max().reset_index()
    save("accuracy_vs_clients.png", "final accuracy (best setting, mean over seeds)", "clients",
         "weighted accuracy", by_algorithm(best, "clients", "acc_weighted"))
    save("round_time_vs_clients.png", "seconds per round", "clients", "seconds",
         by_algorithm(frame.dropna(subset=["seconds_per_round"]), "clients", "seconds_per_round"))
    for key in points[0].grid:
        numeric = key not in cli.RUN_OPTIONS and pd.api.types.is_numeric_dtype(frame[key])
        values = frame[key].dropna().unique() if numeric else []
        if len(values) > 1:
            rows = ok.dropna(subset=[key])
            logx = min(values) > 0 and max(values) >= 10 * min(values)
            save(f"accuracy_vs_{key}.png", f"final accuracy vs {key} (mean over the rest)", key,
                 "weighted accuracy", by_algorithm(rows, key, "acc_weighted"), logx)
    curves = {}
    for p in points:
        evals = _jsonl(os.path.join(out, "points", p.id, "evals.jsonl"))
        curves[p.id] = ([e["round"] for e in evals], [e.get("acc_weighted") for e in evals])
    save("accuracy_curves.png", "accuracy per round, every point", "round", "weighted accuracy",
         curves)
