"""The `fedjax-pfl` command line: `run`, `sweep`, `demo` and `list`.

Examples:
  fedjax-pfl list
  fedjax-pfl demo
  fedjax-pfl run --algorithm fedavg --dataset digits --partition dirichlet --alpha 0.5 \\
      --clients 20 --rounds 50 --eval-every 5 --set client_lr=0.05 --set local_epochs=2
  fedjax-pfl run --config cfg.toml --rounds 10
  fedjax-pfl sweep sweep.toml --out results/my-sweep

A config file is TOML with a `[run]` table (the run options, named like the
flags with underscores: algorithm, dataset, rounds, eval_every, ...) and an
`[algorithm]` table (keyword arguments of the algorithm factory, like `--set`).
Flags override the file. A sweep file has a [sweep] table (run options shared
by every point, and optionally `out`), a [grid] table (key -> list of values;
run options or algorithm keywords) and an [algorithm] table (fixed keywords);
see `fedjax_pfl.sweep`. Set FEDJAX_PFL_DEBUG=1 to get tracebacks.
"""

from __future__ import annotations

import argparse
import datetime
import inspect
import json
import os
import sys
import time

# name: (type, default, help). JAX-using modules are imported lazily, so that
# `--devices` can configure JAX before its backends start.
RUN_OPTIONS = {
    "algorithm": (str, "fedavg", "a name from `fedjax-pfl list`"),
    "dataset": (str, "digits", "a name from `fedjax-pfl list`"),
    "data_dir": (str, None, "folder of the dataset's files, for the datasets read from disk "
                            "(femnist, shakespeare, sent140, cifar10, mnist, pfllib, ...; see "
                            "fedjax_pfl.data.load); with it, --clients takes the first N clients "
                            "of naturally federated data"),
    "partition": (str, "dirichlet", "how pooled data is split among clients"),
    "alpha": (float, None, "Dirichlet concentration (default: 0.5) or synthetic alpha (1.0)"),
    "beta": (float, None, "synthetic beta (default: 1.0)"),
    "classes_per_client": (int, None, "classes per client of 'pathological' (default: 2)"),
    "train_fraction": (float, 0.75, "per-client training fraction"),
    "max_examples_per_client": (int, None, "cap each client's train and test examples at N (a "
                                           "seeded random subsample)"),
    "min_examples": (int, 0, "drop the clients holding fewer than N examples (train + test), as "
                             "LEAF's --min_samples"),
    "layout": (str, "auto", "client data layout: auto (flat when padding to the largest client "
                            "would more than double memory), dense or flat"),
    "clients": (int, 20, "number of clients"),
    "rounds": (int, 50, "communication rounds"),
    "eval_every": (int, 5, "rounds between evaluations"),
    "seed": (int, 0, "seed of the run (init and round keys) and, by default, of the data split"),
    "data_seed": (int, None, "seed of the data split (default: seed)"),
    "model": (str, "mlp", "logreg, mlp, cnn, mlp_bn or cnn_bn (see `list`)"),
    "execution": (str, "vmap", "client-axis strategy: vmap, chunked or sharded"),
    "chunk_size": (int, None, "clients per chunk (chunked: default 64; sharded: optional)"),
    "devices": (int, None, "split the host CPU into N JAX devices (for sharded)"),
    "out": (str, None, "results directory (default: results/<algorithm>-<dataset>-<time>)"),
    "checkpoint_every": (int, None, "rounds between checkpoints in OUT/checkpoints (default: "
                                    "eval_every; 0: none)"),
    "init_params": (str, None, "start from these parameters (.npz of '/'-joined leaf paths, "
                               "see checkpoint.save_params, or flax .msgpack)"),
    "cohorts": (str, None, "replay this cohort schedule instead of sampling (.npy, or .csv/.txt "
                           "with one round's client ids per line)"),
}
IMAGE_MODELS = ("cnn", "cnn_bn")  # the synthetic datasets come as [H, W, C] images
MINIMUM = {"clients": 1, "rounds": 0, "eval_every": 1, "seed": 0, "data_seed": 0, "chunk_size": 1,
           "devices": 1, "checkpoint_every": 0, "max_examples_per_client": 1,
           "min_examples": 0}
SUMMARY_KEYS = ("acc_weighted", "acc_mean", "acc_std", "acc_min", "acc_p10", "acc_p50",
                "acc_p90", "acc_jain")


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, no usage dump
        self.exit(2, f"{self.prog}: error: {message}\n")


def parse_value(text: str):
    """Parses a `--set` value: None/null, true/false, int, float, JSON list, else str."""
    low = text.strip().lower()
    if low in ("none", "null"):
        return None
    if low in ("true", "false"):
        return low == "true"
    for convert in (int, float):
        try:
            return convert(text)
        except ValueError:
            pass
    if text.strip()[:1] in ("[", "{"):
        try:
            return json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"--set: cannot parse {text!r} as JSON: {e}") from e
    return text


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="fedjax-pfl", description=__doc__,
                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    run = sub.add_parser("run", help="run one algorithm and write a results directory")
    for name, (kind, default, text) in RUN_OPTIONS.items():
        metavar = "DIR" if name in ("out", "data_dir") else {int: "N", float: "X"}.get(kind, "NAME")
        run.add_argument("--" + name.replace("_", "-"), type=kind, default=None, metavar=metavar,
                         help=text if default is None else f"{text} (default: {default})")
    run.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                     help="an algorithm factory keyword argument (repeatable)")
    run.add_argument("--config", metavar="FILE", help="TOML file: [run] and [algorithm] tables")
    run.add_argument("--quiet", action="store_true", help="no progress bar")
    run.add_argument("--resume", metavar="DIR", help="continue the run in results directory DIR "
                     "from its newest checkpoint (options come from DIR/config.json; flags given "
                     "here override them, e.g. --rounds to extend the run)")
    run.add_argument("--overwrite", action="store_true",
                     help="replace the results in a non-empty --out")
    run.add_argument("--tensorboard", action="store_true",
                     help="also write TensorBoard events to OUT/tensorboard (extra [tensorboard])")
    for flag, kind, metavar, text in (
            ("--num-processes", int, "N", "run in N processes (JAX multi-controller; needs "
                                          "--execution sharded; env FEDJAX_PFL_NUM_PROCESSES)"),
            ("--process-id", int, "I", "this process's index in [0, N) "
                                       "(env FEDJAX_PFL_PROCESS_ID)"),
            ("--coordinator", str, "HOST:PORT", "address of process 0, which serves it (env "
                                                "FEDJAX_PFL_COORDINATOR)")):
        run.add_argument(flag, type=kind, metavar=metavar, help=text)
    sweep = sub.add_parser("sweep", help="run a grid of configurations, vmapped where only "
                           "numbers and seeds differ")
    sweep.add_argument("config", metavar="CONFIG.toml",
                       help="TOML file: [sweep], [grid] and [algorithm] tables")
    sweep.add_argument("--out", metavar="DIR", help="sweep directory (default: [sweep] out, "
                       "else results/sweep-<config name>); re-running resumes it")
    sweep.add_argument("--overwrite", action="store_true",
                       help="replace a different sweep found in --out")
    sweep.add_argument("--quiet", action="store_true", help="no progress bars")
    demo = sub.add_parser("demo", help="FedFew, meta-FL and FedAPM next to their baselines "
                          "(3 scenarios, about a minute on 2 cores)")
    demo.add_argument("--rounds", type=int, default=100, metavar="N",
                      help="rounds per run (default 100)")
    demo.add_argument("--eval-every", type=int, default=10, metavar="N",
                      help="rounds between evaluations (default 10)")
    demo.add_argument("--seed", type=int, default=0, metavar="N",
                      help="seed of the runs and the data (default 0)")
    demo.add_argument("--out", default="demo_results", metavar="DIR",
                      help="where the table (summary.csv), the figure (demo.png) and each run's "
                           "results (<scenario>/<method>/) go (default: demo_results)")
    sub.add_parser("list", help="list algorithms, datasets, partitions and models")
    return parser


def _load_toml(path: str, tables: tuple[str, ...], flag: str = "config") -> dict[str, dict]:
    """The tables of a TOML file (missing ones empty); anything else is an error."""
    from fedjax_pfl import validation

    blob = validation.load_toml(path, flag)
    if set(blob) - set(tables) or not all(isinstance(blob.get(t, {}), dict) for t in tables):
        names = [f"[{t}]" for t in tables]
        raise ValueError(f"{flag}: {path}: expected only {', '.join(names[:-1])} and "
                         f"{names[-1]} tables, got {sorted(blob)}.")
    return {t: blob.get(t, {}) for t in tables}


def _load_config(path: str) -> tuple[dict, dict]:
    blob = _load_toml(path, ("run", "algorithm"))
    return blob["run"], blob["algorithm"]


def _resolve(args) -> tuple[dict, dict]:
    """Run options and factory kwargs: defaults < config file (or --resume's config) < flags."""
    file_run, file_algo = _load_config(args.config) if args.config else ({}, {})
    if args.resume:
        if args.config:
            raise ValueError("--config: not with --resume (the run's options come from "
                             "DIR/config.json).")
        file_run, file_algo = _saved_config(args.resume)
    unknown = set(file_run) - set(RUN_OPTIONS)
    if unknown:
        raise ValueError(f"config: unknown [run] keys {sorted(unknown)}; expected some of "
                         f"{list(RUN_OPTIONS)}.")
    cfg = {name: spec[1] for name, spec in RUN_OPTIONS.items()}
    cfg.update(file_run)
    cfg.update({k: v for k, v in vars(args).items() if k in RUN_OPTIONS and v is not None})
    _check_options(cfg)
    algo = dict(file_algo)
    for item in args.set:
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"--set: expected KEY=VALUE, got {item!r}.")
        algo[key.strip()] = parse_value(text)
    return cfg, algo


def _saved_config(directory: str) -> tuple[dict, dict]:
    """The [run] options and algorithm kwargs saved in a results directory's config.json."""
    path = os.path.join(directory, "config.json")
    try:
        with open(path) as f:
            saved = json.load(f)
        run, algo = saved["run"], saved["algorithm"]
    except OSError as e:
        raise ValueError(f"--resume: cannot read {path}: {e.strerror or e}") from e
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"--resume: {path} is not a fedjax-pfl config.json ({e}).") from e
    run = {k: v for k, v in run.items() if k in RUN_OPTIONS}
    return {**run, "out": directory}, algo


def _check_options(cfg: dict) -> None:
    """Checks the types and minimums of run options in place (ints become floats where due)."""
    for name, (kind, _, _) in RUN_OPTIONS.items():
        v = cfg.get(name)
        if kind is float and isinstance(v, int) and not isinstance(v, bool):
            cfg[name] = v = float(v)
        if v is not None and (type(v) is not kind):
            raise ValueError(f"{name}: expected {kind.__name__}, got {v!r}.")
        if v is not None and name in MINIMUM and v < MINIMUM[name]:
            raise ValueError(f"{name}: expected an int >= {MINIMUM[name]}, got {v}.")


def accepted_kwargs(factory) -> set[str]:
    """Keyword arguments `factory(model, **kw)` accepts: its config's fields and their old
    spellings (`core.config.factory`)."""
    return set(factory.keywords) | set(factory.aliases)


def _dataset_kwargs(cfg: dict) -> dict:
    """Dataset options that apply to the chosen dataset/partition (defaults filled in cfg)."""
    synthetic, part = cfg["dataset"] == "synthetic", cfg["partition"]
    natural = bool(cfg.get("data_dir")) and cfg["dataset"] in _natural_loaders()
    applies = {"alpha": not natural and (synthetic or part == "dirichlet"), "beta": synthetic,
               "classes_per_client": not natural and not synthetic and part == "pathological"}
    defaults = {"alpha": 1.0 if synthetic else 0.5, "beta": 1.0, "classes_per_client": 2}
    kwargs = {}
    for name, ok in applies.items():
        if not ok and cfg[name] is not None:
            raise ValueError(f"{name}: does not apply to dataset {cfg['dataset']!r} with "
                             f"partition {part!r}.")
        if ok:
            kwargs[name] = cfg[name] = defaults[name] if cfg[name] is None else cfg[name]
    return kwargs


def _natural_loaders() -> set[str]:
    from fedjax_pfl.data.loaders import NATURAL

    return set(NATURAL)


def _algorithm_kwargs(cfg: dict, algo_kwargs: dict) -> dict:
    """Validates the registry names and the factory kwargs; returns the kwargs to pass."""
    import fedjax_pfl as fp
    from fedjax_pfl.core.execution import STRATEGIES

    datasets = fp.data.LOADERS if cfg.get("data_dir") else fp.data.DATASETS
    if not cfg.get("data_dir") and cfg["dataset"] in fp.data.LOADERS and (
            cfg["dataset"] not in fp.data.DATASETS):
        raise ValueError(f"data_dir: dataset {cfg['dataset']!r} is read from local files; "
                         "give their folder with --data-dir PATH (see fedjax_pfl.data.load).")
    for kind, registry in (("algorithm", fp.ALGORITHMS), ("dataset", datasets),
                           ("partition", fp.data.PARTITIONS), ("model", fp.models.MODELS),
                           ("execution", STRATEGIES), ("layout", fp.data.LAYOUTS)):
        if cfg[kind] not in registry:
            raise ValueError(f"{kind}: unknown {kind} {cfg[kind]!r}; expected one of "
                             f"{sorted(registry)}.")
    accepted = accepted_kwargs(fp.ALGORITHMS[cfg["algorithm"]])
    for key in algo_kwargs:
        if key == "execution":
            raise ValueError("execution: set it with --execution/--chunk-size ([run] table).")
        if key not in accepted:
            raise ValueError(f"--set/[algorithm]: {cfg['algorithm']} has no option {key!r}; "
                             f"it accepts {sorted(accepted - {'execution'})}.")
    kwargs = dict(algo_kwargs)
    if cfg["execution"] != "vmap" or cfg["chunk_size"] is not None:
        if "execution" not in accepted:
            raise ValueError(f"execution: {cfg['algorithm']} does not take an execution.")
        chunk = cfg["chunk_size"] or (64 if cfg["execution"] == "chunked" else None)
        kwargs["execution"] = fp.Execution(cfg["execution"], chunk_size=chunk)
    return kwargs


def _load_data(cfg: dict):
    """(train, test, info) of the resolved options (fills dataset defaults into cfg)."""
    import fedjax_pfl as fp

    seed = cfg["seed"] if cfg.get("data_seed") is None else cfg["data_seed"]
    if cfg.get("data_dir"):
        natural = cfg["dataset"] in _natural_loaders()
        kwargs = _dataset_kwargs(cfg)
        return fp.data.load(cfg["dataset"], root=cfg["data_dir"], num_clients=cfg["clients"],
                            partition=cfg["partition"], seed=seed,
                            train_fraction=cfg["train_fraction"],
                            max_examples_per_client=cfg["max_examples_per_client"],
                            min_examples=cfg["min_examples"], layout=cfg["layout"],
                            **({} if natural else kwargs))
    return fp.data.federated_dataset(
        cfg["dataset"], num_clients=cfg["clients"], partition=cfg["partition"],
        seed=cfg["seed"] if cfg.get("data_seed") is None else cfg["data_seed"],
        train_fraction=cfg["train_fraction"], image=cfg["model"] in IMAGE_MODELS,
        max_examples_per_client=cfg["max_examples_per_client"],
        min_examples=cfg["min_examples"], layout=cfg["layout"], **_dataset_kwargs(cfg))


def _build(cfg: dict, algo_kwargs: dict, data=None, processes=None):
    """(algorithm, train, test, info) for resolved options; validates names first.

    Args:
      cfg, algo_kwargs: resolved run options and factory kwargs.
      data: (train, test, info) already loaded for cfg (default: load it).
      processes: (coordinator, N, process id) to join a run of N > 1 processes:
        train and test become global arrays built from this process's clients.
    """
    import fedjax_pfl as fp

    kwargs = _algorithm_kwargs(cfg, algo_kwargs)
    if cfg["devices"]:
        try:
            fp.use_cpu_devices(cfg["devices"])
        except RuntimeError as e:
            raise RuntimeError(f"devices: JAX is already initialised in this process ({e})") from e
    if processes:
        fp.distributed.initialize(*processes)
    train, test, info = data if data is not None else _load_data(cfg)
    model = fp.models.MODELS[cfg["model"]](info["input_shape"], info["num_classes"])
    if processes:
        train, test = _own_clients(model, train, test)
    return fp.ALGORITHMS[cfg["algorithm"]](model, **kwargs), train, test, info


def _own_clients(model, train, test):
    """This process's block of clients, checked here, as global client-sharded data.

    The loaders build every client on the host; only this process's block goes
    to its devices (a custom loader can build just `distributed.client_block`).
    """
    import jax

    from fedjax_pfl import distributed, validation

    with distributed.together():
        block = distributed.client_block(train.num_clients)
        own = [jax.tree.map(lambda a: a[block], data) for data in (train, test)]
        validation.check_data(model, own[0], "train")
        validation.check_data(model, own[1], "test")
    return tuple(distributed.place_clients(d, train.num_clients) for d in own)


def _run_config(cfg: dict, algo_kwargs: dict, info: dict, out: str | None) -> dict:
    """The configuration saved as a run's config.json."""
    from fedjax_pfl import __version__

    return {"run": {**cfg, "out": out}, "algorithm": algo_kwargs, "version": __version__,
            "data": {k: info[k] for k in ("num_classes", "input_shape", "partition")} | {
                "train_examples": int(info["train_sizes"].sum()),
                "test_examples": int(info["test_sizes"].sum())}}


def _table(rows: list[dict], columns: list[str]) -> str:
    def fmt(v):
        return f"{v:.4f}" if isinstance(v, float) else str(v)

    cells = [columns] + [[fmt(r.get(c, "-")) for c in columns] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(columns))]
    return "\n".join("  ".join(c.rjust(w) if i else c.ljust(w)
                               for i, (c, w) in enumerate(zip(row, widths))) for row in cells)


def _summary(result) -> list[dict]:
    final = result.final()
    best = max(result.evals, key=lambda e: e["acc_weighted"])
    names = ["weighted", "unweighted mean", "std", "min", "p10", "p50", "p90"]
    rows = [{"metric": f"accuracy {n}", "value": final[k]} for n, k in zip(names, SUMMARY_KEYS)]
    rows.append({"metric": "Jain index (accuracy)", "value": final["acc_jain"]})
    rows.append({"metric": "best round (weighted acc)",
                 "value": f"{best['round']} ({best['acc_weighted']:.4f})"})
    return rows


def _execute(cfg: dict, algo_kwargs: dict, out: str | None, progress: bool, *,
             resume: bool = False, overwrite: bool = False, tensorboard: bool = False,
             processes=None):
    """Builds and runs one configuration; `simulate` writes its results under `out`.

    `simulate` checks `out` (refused if not empty unless resume/overwrite, and
    writable) before anything compiles. With `processes` (see `_build`) only
    process 0 writes results and prints.

    Returns:
      (result, wall seconds of `simulate`).
    """
    algorithm, train, test, info = _build(cfg, algo_kwargs, processes=processes)
    from fedjax_pfl import TrainingDiverged, callbacks, client_mesh, distributed, simulate
    from fedjax_pfl.results import check_output

    if processes:  # process 0 writes the results; the others stop if it cannot
        with distributed.together():
            if processes[2] == 0:
                check_output(out, resume=resume, overwrite=overwrite)
        if processes[2] != 0:
            out, progress, tensorboard = None, False, False

    every = cfg["eval_every"] if cfg["checkpoint_every"] is None else cfg["checkpoint_every"]
    cfg["checkpoint_every"] = every
    hooks = [callbacks.TensorBoard(os.path.join(out, "tensorboard"))] if tensorboard and out else []
    if not processes or processes[2] == 0:
        print(f"{cfg['algorithm']} on {cfg['dataset']} ({info['partition']}, {cfg['clients']} "
              f"clients, {cfg['model']}, {algo_kwargs}): {cfg['rounds']} rounds", flush=True)
    init_params = cohorts = None
    if cfg["init_params"]:
        from fedjax_pfl.checkpoint import load_params

        init_params = load_params(cfg["init_params"])
    if cfg["cohorts"]:
        cohorts = _load_cohorts(cfg["cohorts"])
    t0 = time.perf_counter()
    try:
        result = simulate(algorithm, train, test, rounds=cfg["rounds"], init_params=init_params,
                          cohorts=cohorts,
                          eval_every=cfg["eval_every"], seed=cfg["seed"], progress=progress,
                          out=out, overwrite=overwrite, resume=resume,
                          config=_run_config(cfg, algo_kwargs, info, out),
                          checkpoint_every=(every or None) if out else None, callbacks=hooks,
                          mesh=client_mesh() if cfg["execution"] == "sharded" else None)
    except TrainingDiverged:
        if progress:  # the unfinished progress bar
            print(file=sys.stderr)
        raise
    return result, time.perf_counter() - t0


def _load_cohorts(path: str):
    """A cohort schedule [R, S] from .npy, or text (.csv/.txt: one round per line)."""
    import numpy as np

    try:
        if path.endswith(".npy"):
            return np.load(path, allow_pickle=False)
        return np.loadtxt(path, delimiter="," if path.endswith(".csv") else None,
                          dtype=np.int64, ndmin=2)
    except (OSError, ValueError) as e:
        raise ValueError(f"cohorts: cannot read {path!r} as an int [rounds, clients] "
                         f"schedule: {e}.") from None


def _processes(args, cfg: dict):
    """(coordinator, N, process id) of a run in N > 1 processes, else None (checked first)."""
    from fedjax_pfl import distributed

    coordinator, num, pid = distributed.resolve(args.coordinator, args.num_processes,
                                                args.process_id)
    if not num or num == 1:
        return None
    if cfg["execution"] != "sharded":
        raise ValueError(f"--execution: several processes run the client axis sharded over "
                         f"their devices; expected --execution sharded, got {cfg['execution']!r}.")
    if args.resume or cfg["checkpoint_every"]:
        flag = "--resume" if args.resume else "--checkpoint-every"
        raise ValueError(f"{flag}: checkpoints are not supported with several processes.")
    cfg["checkpoint_every"] = 0
    return coordinator, num, pid


def _cmd_run(args) -> int:
    cfg, algo_kwargs = _resolve(args)
    processes = _processes(args, cfg)
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    out = cfg["out"] or os.path.join("results", f"{cfg['algorithm']}-{cfg['dataset']}-{stamp}")
    result, seconds = _execute(cfg, algo_kwargs, out, progress=not args.quiet,
                               resume=bool(args.resume), overwrite=args.overwrite,
                               tensorboard=args.tensorboard, processes=processes)
    if processes and processes[2] != 0:
        print(f"process {processes[2]} of {processes[1]}: done in {seconds:.1f} s")
        return 0
    losses = {h["round"]: h["train_loss"] for h in result.history}
    rows = [{**e, "train_loss": losses.get(e["round"], "-")} for e in result.evals]
    print(_table(rows, ["round", "train_loss", "acc_weighted", "acc_mean", "acc_min"]) + "\n")
    print(_table(_summary(result), ["metric", "value"]))
    print(f"\n{seconds:.1f} s; results in {out}")
    return 0


def _cmd_sweep(args) -> int:
    from fedjax_pfl.sweep import sweep

    blob = _load_toml(args.config, ("sweep", "grid", "algorithm"))
    base = dict(blob["sweep"])
    stem = os.path.splitext(os.path.basename(args.config))[0]
    out = args.out or base.pop("out", None) or os.path.join("results", f"sweep-{stem}")
    base.pop("out", None)
    if not isinstance(out, str):
        raise ValueError(f"out: expected a directory name, got {out!r}.")
    frame = sweep(blob["grid"], base=base, algorithm_kwargs=blob["algorithm"], out=out,
                  progress=not args.quiet, overwrite=args.overwrite)
    columns = [c for c in frame.columns[1:frame.columns.get_loc("status") + 1]
               if frame[c].nunique(dropna=False) > 1 or c in ("algorithm", "status")]
    columns += ["acc_weighted", "acc_min", "seconds_per_round"]
    print(_table(frame.astype(object).where(frame.notna(), "-").to_dict("records"), columns))
    print(f"\n{len(frame)} points; table, plots and per-point results in {out}")
    return 0


def _cmd_demo(args) -> int:
    from fedjax_pfl import demo, validation

    start = time.perf_counter()
    validation.check_int("rounds", args.rounds, minimum=0)
    validation.check_int("eval_every", args.eval_every, minimum=1)
    validation.check_seed("seed", args.seed)
    os.makedirs(args.out, exist_ok=True)
    print(f"fedjax-pfl demo: {len(demo.SCENARIOS)} scenarios x 3 methods, {args.rounds} rounds "
          f"each; results in {args.out}", flush=True)
    rows, results = demo.run(rounds=args.rounds, eval_every=args.eval_every, seed=args.seed,
                             out=args.out, echo=lambda line: print(line, flush=True))
    demo.write_table(rows, os.path.join(args.out, "summary.csv"))
    figure = os.path.join(args.out, "demo.png")
    try:
        demo.plot(results, figure)
    except ImportError as e:
        figure = f"not drawn ({e})"
    print()
    shown = [{**r, "seconds": f"{r['seconds']:.1f}",
              **{k: f"{r[k]:.3f}" for k in ("acc_mean", "acc_weighted", "acc_min")}}
             for r in rows]
    print(_table(shown, list(demo.COLUMNS)))
    print(f"\n{time.perf_counter() - start:.1f} s; table {os.path.join(args.out, 'summary.csv')}, "
          f"figure {figure}")
    return 0


def _cmd_list(args) -> int:
    import fedjax_pfl as fp

    for title, registry in (("Algorithms", fp.ALGORITHMS), ("Datasets", fp.data.DATASETS),
                            ("Partitions", fp.data.PARTITIONS), ("Models", fp.models.MODELS)):
        print(f"{title}:")
        width = max(map(len, registry))
        for name, obj in registry.items():
            print(f"  {name.ljust(width)}  {(inspect.getdoc(obj) or '').partition(chr(10))[0]}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of `fedjax-pfl`; returns the exit status.

    Args:
      argv: the arguments (default: `sys.argv[1:]`).
    """
    try:
        args = _parser().parse_args(argv)
    except SystemExit as e:  # --help, or a usage error already printed
        return e.code if isinstance(e.code, int) else 0
    command = {"run": _cmd_run, "sweep": _cmd_sweep, "demo": _cmd_demo,
               "list": _cmd_list}[args.command]
    try:
        return command(args)
    except BrokenPipeError:  # e.g. `fedjax-pfl list | head`
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except (ValueError, TypeError, KeyError, ImportError, OSError, RuntimeError,
            FloatingPointError) as e:  # FloatingPointError: TrainingDiverged
        if os.environ.get("FEDJAX_PFL_DEBUG"):
            raise
        message = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
        print(f"fedjax-pfl: error: {' '.join(str(message).split())}", file=sys.stderr)
        _exit_now_if_distributed(1)
        return 1
    except KeyboardInterrupt:
        print("fedjax-pfl: interrupted", file=sys.stderr)
        return 130


def _exit_now_if_distributed(code: int) -> None:
    """In a run of several processes, exits without JAX's shutdown barrier, which would
    wait (minutes) for processes that are themselves waiting for this one."""
    jax = sys.modules.get("jax")
    if jax is not None and jax.distributed.is_initialized():
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


if __name__ == "__main__":
    sys.exit(main())
