"""Partial personalization benchmark: FedAvg, FedProx, FedAlt, FedSim, FedRep, FedPer, FedAPM,
LG-FedAvg, FedBABU, FedRoD.

Two settings, 20 clients, 30% (6) per round:
* `mnist`: the 5000-example MNIST subset, Dirichlet(0.5) label skew, 75/25 per-client split,
  MLP 784-64-10, personal block = `head` (every partial method);
* `multimodal`: `data.multimodal_synthetic(20)` with `models.two_encoder`; personal block =
  the two encoders for FedAlt / FedSim / FedAPM, the head for FedRep / FedPer (their definition);
  LG-FedAvg federates the head (its local representation stays personal), FedBABU federates the
  body under a frozen head and fine-tunes one epoch at evaluation, FedRoD keeps a personal head
  next to the shared generic one (their definitions, on both datasets).

Each algorithm runs 3 seeds vmapped in one compile. Reported: max over evaluations (every
`--eval-every` rounds) of the unweighted client-mean accuracy, class-weighted F1 and macro
one-vs-rest AUC (absent classes count 0, as in torchmetrics / the FedAPM code), mean ± std over
seeds; client drift = mean over the first 30 rounds of the cohort-mean Σ_tensors ‖u_i − u‖_F.
FedAPM is evaluated with both protocols ("local": (v_i, u_i), the code's; "global": (v_i, u)).
Then: FedAPM / FedAlt / FedAvg round time at M ∈ {20, 1000, 10000} (synthetic data) and the
state's bytes per client.

Reproduce: .venv/bin/python benchmarks/partial_personalization.py  (about 10-15 min on 2 cores)

FedAPM vs FedAlt side by side (one process, rounds interleaved, medians; also in the full run):
  .venv/bin/python benchmarks/partial_personalization.py --apm-vs-alt-only --clients 10000
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
import _common  # noqa: E402

import fedjax_pfl as fp  # noqa: E402
from fedjax_pfl import metrics  # noqa: E402
from fedjax_pfl.simulate import run_rounds  # noqa: E402

ORDER = ("fedavg", "fedprox", "fedalt", "fedsim", "fedrep", "fedper", "fedapm", "lg_fedavg",
         "fedbabu", "fedrod")


def load(name):
    if name == "mnist":
        train, test, info = fp.data.federated_dataset("mnist", num_clients=20, alpha=0.5, seed=0)
        model = fp.models.mlp(info["input_shape"], info["num_classes"], hidden=(64,))
        return train, test, model, ("head",)
    train, test, info = fp.data.multimodal_synthetic(20, seed=0)
    model = fp.models.two_encoder(info["dims"], info["num_classes"])
    return train, test, model, fp.models.ENCODERS


def configs(personal, args):
    common = {"clients_per_round": 6, "batch_size": args.batch_size,
              "local_epochs": args.epochs, "local_steps": None}
    lr = {"client_lr": args.lr}
    return {
        "fedavg": {**common, **lr},
        "fedprox": {**common, **lr, "mu": 0.1},
        "fedalt": {**common, **lr, "personal": personal},
        "fedsim": {**common, **lr, "personal": personal},
        "fedrep": {**common, **lr},
        "fedper": {**common, **lr},
        # α_i = 1/M scales the data step by 1/20: lr·20 gives the same data step as the others.
        "fedapm": {**common, "client_lr": args.lr * 20, "personal": personal},
        "lg_fedavg": {**common, **lr},
        "fedbabu": {**common, **lr, "ft_epochs": 1, "ft_batch_size": args.batch_size,
                    "ft_lr": args.lr},
        "fedrod": {**common, **lr},
    }


def run(name, config, model, train, test, args):
    algo = fp.ALGORITHMS[name](model, **config)
    evals = [algo.evaluate]
    if name == "fedapm":
        evals.append(fp.ALGORITHMS[name](model, **config, evaluation="global").evaluate)
    seeds = jnp.arange(args.seeds)
    init = jax.jit(jax.vmap(lambda s: algo.init(jax.random.key(s), train)))
    block = jax.jit(jax.vmap(functools.partial(run_rounds, algo.round, num_rounds=args.eval_every),
                             in_axes=(0, None, 0)))
    ev = [jax.jit(jax.vmap(e, in_axes=(0, None, None))) for e in evals]
    state = init(seeds)
    keys = jax.vmap(lambda s: jax.random.fold_in(jax.random.key(s), 1))(seeds)
    curves = [[] for _ in ev]
    drift = []
    t0 = time.perf_counter()
    for r in range(0, args.rounds + 1, args.eval_every):
        if r:
            state, m = block(state, train, keys)
            drift.append(np.asarray(m.get("drift", np.full((args.seeds, 1), np.nan))))
        for j, e in enumerate(ev):
            per = jax.device_get(e(state, train, test))
            curves[j].append([seed_summary(per, s) for s in range(args.seeds)])
    seconds = time.perf_counter() - t0
    drift = np.concatenate(drift, axis=1)[:, :30] if drift else None
    out = {}
    for j, label in enumerate(["", "_global"][: len(ev)]):
        c = np.asarray([[[p[k] for k in ("acc", "f1", "auc", "auc_skip")] for p in row]
                        for row in curves[j]])
        best = c.max(axis=0)  # [seeds, 4]: max over evaluations
        out[name + label] = {
            "acc": [float(best[:, 0].mean()), float(best[:, 0].std())],
            "f1": [float(best[:, 1].mean()), float(best[:, 1].std())],
            "auc": [float(best[:, 2].mean()), float(best[:, 2].std())],
            "auc_skip": [float(best[:, 3].mean()), float(best[:, 3].std())],
            "drift_30": None if drift is None or np.isnan(drift).all() else float(drift.mean()),
            "curve_acc": c[:, :, 0].mean(axis=1).tolist(),
            "seconds": seconds, "config": {k: str(v) for k, v in config.items()},
        }
    return out


def seed_summary(per, s):
    one = {k: np.asarray(v)[s] for k, v in per.items()}
    table = metrics.client_table(one)
    has = table["num_examples"] > 0
    return {"acc": table["accuracy"][has].mean(), "f1": table["f1"][has].mean(),
            "auc": table["auc"][has].mean(), "auc_skip": np.nanmean(table["auc_skip"][has])}


def synthetic_clients(m, n=20, features=60, classes=10, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(m, n, features)).astype(np.float32)
    w = rng.normal(size=(features, classes)).astype(np.float32)
    y = np.argmax(x @ w, -1).astype(np.int32)
    return fp.ClientData({"x": jnp.asarray(x), "y": jnp.asarray(y)},
                         jnp.full((m,), n, jnp.int32))


def round_times(args):
    rows = []
    model = fp.models.mlp((60,), 10, hidden=(32,))
    for m in args.sizes:
        train = synthetic_clients(m)
        cohort = max(1, int(0.3 * m))
        for name in ("fedavg", "fedalt", "fedapm"):
            cfg = {"clients_per_round": cohort, "batch_size": 10, "local_epochs": 1,
                   "local_steps": None, "client_lr": 0.05}
            if m >= 1000:
                cfg["execution"] = fp.Execution("chunked", chunk_size=128)
            algo = fp.ALGORITHMS[name](model, **cfg)
            state = algo.init(jax.random.key(0), train)
            round_fn = jax.jit(algo.round, donate_argnums=0)  # as in `simulate`
            t0 = time.perf_counter()
            state, _ = jax.block_until_ready(round_fn(state, train, jax.random.key(1)))
            compile_s = time.perf_counter() - t0
            times = []
            for r in range(args.timing_rounds):
                t0 = time.perf_counter()
                state, _ = jax.block_until_ready(round_fn(state, train, jax.random.key(r + 2)))
                times.append(time.perf_counter() - t0)
            per_client = sum(a.nbytes for a in jax.tree.leaves(state)
                             if a.ndim and a.shape[0] == m) / m
            rows.append({"algorithm": name, "M": m, "cohort": cohort,
                         "median_round_s": float(np.median(times)), "compile_s": compile_s,
                         "state_bytes_per_client": per_client})
            print(rows[-1], flush=True)
    return rows


def apm_vs_alt(m, repeats=15):
    """FedAPM and FedAlt rounds timed side by side at M = m (round_times' workload).

    Both are compiled and warmed up, then take turns round by round so that load
    from other processes hits them alike. Returns medians of wall-clock and of
    process CPU time (less sensitive to other processes on a shared machine) and
    FedAPM / FedAlt for each.
    """
    model = fp.models.mlp((60,), 10, hidden=(32,))
    train = synthetic_clients(m)
    cfg = {"clients_per_round": max(1, int(0.3 * m)), "batch_size": 10, "local_epochs": 1,
           "local_steps": None, "client_lr": 0.05,
           "execution": fp.Execution("chunked", chunk_size=128)}
    names = ("fedalt", "fedapm")
    states, fns = {}, {}
    for name in names:
        algo = fp.ALGORITHMS[name](model, **cfg)
        states[name] = algo.init(jax.random.key(0), train)
        fns[name] = jax.jit(algo.round, donate_argnums=0)
        states[name], _ = jax.block_until_ready(fns[name](states[name], train, jax.random.key(1)))
    wall, cpu = {n: [] for n in names}, {n: [] for n in names}
    for r in range(repeats):
        for name in names:
            t0, c0 = time.perf_counter(), time.process_time()
            states[name], _ = jax.block_until_ready(
                fns[name](states[name], train, jax.random.key(r + 2)))
            wall[name].append(time.perf_counter() - t0)
            cpu[name].append(time.process_time() - c0)
    row = {"M": m, "cohort": cfg["clients_per_round"], "chunk_size": 128, "repeats": repeats}
    for name in names:
        row[f"{name}_round_s"] = float(np.median(wall[name]))
        row[f"{name}_cpu_s"] = float(np.median(cpu[name]))
        row[f"{name}_round_times"] = wall[name]
    row["ratio_wall"] = row["fedapm_round_s"] / row["fedalt_round_s"]
    row["ratio_cpu"] = row["fedapm_cpu_s"] / row["fedalt_cpu_s"]
    print(f"M={m}: FedAPM / FedAlt round = {row['ratio_wall']:.3f} (wall medians "
          f"{row['fedapm_round_s']:.4f} / {row['fedalt_round_s']:.4f} s), "
          f"{row['ratio_cpu']:.3f} (process CPU)", flush=True)
    return row


def base_evaluate_client(model, params, data):
    """`local.evaluate_client` before F1/AUC statistics were added (for the cost comparison)."""
    logits = model.apply(params, data.examples, None)
    mask = jnp.arange(logits.shape[0]) < data.num_examples
    correct = (jnp.argmax(logits, -1) == data.examples["y"]) & mask
    loss = jnp.where(mask, model.loss(logits, data.examples), 0.0)
    return {"num_examples": data.num_examples.astype(jnp.float32),
            "num_correct": jnp.sum(correct).astype(jnp.float32), "loss_sum": jnp.sum(loss)}


def eval_cost(args):
    """Median seconds of one all-client evaluation, with and without the F1/AUC statistics."""
    from fedjax_pfl.core import local

    rows = []
    for m, n, kind in ((20, 63, "mlp"), (1000, 50, "mlp"), (10000, 20, "mlp"), (100, 50, "cnn")):
        test = synthetic_clients(m, n=n)
        model = fp.models.mlp((60,), 10, hidden=(32,))
        if kind == "cnn":  # the FedAvg CNN on 28x28x1 inputs
            x = jax.random.uniform(jax.random.key(1), (m, n, 28, 28, 1))
            test = test.replace(examples={"x": x, "y": test.examples["y"]})
            model = fp.models.cnn((28, 28, 1), 10)
        params = model.init(jax.random.key(0))
        fns = {"base": base_evaluate_client, "with_f1_auc": local.evaluate_client}
        jitted = {k: jax.jit(jax.vmap(functools.partial(f, model, params))) for k, f in fns.items()}
        for f in jitted.values():
            jax.block_until_ready(f(test))
        times = {k: [] for k in jitted}
        for _ in range(args.timing_rounds):
            for k, f in jitted.items():  # interleaved, side by side
                t0 = time.perf_counter()
                jax.block_until_ready(f(test))
                times[k].append(time.perf_counter() - t0)
        med = {k: float(np.median(v)) for k, v in times.items()}
        rows.append({"model": kind, "M": m, "N": n, **med,
                     "ratio": med["with_f1_auc"] / med["base"]})
        print(rows[-1], flush=True)
    return rows


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--rounds", type=int, default=60)
    p.add_argument("--eval-every", type=int, default=5)
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--datasets", default="mnist,multimodal")
    p.add_argument("--methods", default=",".join(ORDER), help="comma-separated subset of ORDER")
    p.add_argument("--sizes", default="20,1000,10000")
    p.add_argument("--timing-rounds", type=int, default=5)
    p.add_argument("--out", default="benchmarks/results/partial_personalization.json")
    p.add_argument("--apm-vs-alt-only", action="store_true",
                   help="only FedAPM vs FedAlt side by side at M = --clients")
    p.add_argument("--clients", type=int, default=10000, help="M for --apm-vs-alt-only")
    p.add_argument("--repeats", type=int, default=15, help="timed rounds for --apm-vs-alt-only")
    p.add_argument("--eval-cost-only", action="store_true",
                   help="only time evaluation with vs without the F1/AUC statistics")
    args = p.parse_args()
    if args.eval_cost_only:
        _common.write_json("benchmarks/results/partial_eval_cost.json", {
            "hardware": _common.hardware(), "rows": eval_cost(args)})
        return
    if args.apm_vs_alt_only:
        out = f"benchmarks/results/partial_apm_vs_alt_M{args.clients}.json"
        rows = [apm_vs_alt(args.clients, args.repeats)]
        _common.write_json(args.out if args.out != p.get_default("out") else out, {
            "hardware": _common.hardware(), "versions": _common.versions(),
            "load_average_after": os.getloadavg(),
            "note": "shared 2-core CPU VM, loaded by other processes while timing",
            "rows": rows})
        return
    args.sizes = [int(s) for s in args.sizes.split(",") if s]
    result = {"args": vars(args), "hardware": _common.hardware(), "versions": _common.versions(
        ("jax", "jaxlib", "flax", "optax", "numpy")), "tables": {}}
    for dataset in [d for d in args.datasets.split(",") if d]:
        train, test, model, personal = load(dataset)
        table = {}
        chosen = [m for m in args.methods.split(",") if m]
        for name, config in configs(personal, args).items():
            if name not in chosen:
                continue
            table.update(run(name, config, model, train, test, args))
            print(dataset, name, {k: v for k, v in table[name].items()
                                  if k not in ("curve_acc", "config")}, flush=True)
        result["tables"][dataset] = table
        _common.write_json(args.out, result)
    result["round_times"] = round_times(args) if args.sizes else []
    result["apm_vs_alt"] = [apm_vs_alt(m, args.timing_rounds) for m in args.sizes if m >= 1000]
    _common.write_json(args.out, result)
    print(markdown(result))


def markdown(result):
    lines = []
    for dataset, table in result["tables"].items():
        header = ["algorithm", "accuracy", "F1 (weighted)", "AUC (macro OvR, absent=0)",
                  "AUC (absent skipped)", "drift (30 rounds)"]
        keys = ("acc", "f1", "auc", "auc_skip")
        rows = [[name, *(f"{v[k][0]:.3f} ± {v[k][1]:.3f}" for k in keys),
                 "n/a" if v["drift_30"] is None else f"{v['drift_30']:.3f}"]
                for name, v in table.items()]
        lines += [f"**{dataset}**", "", _common.markdown_table(header, rows), ""]
    if result.get("round_times"):
        header = ["algorithm", "M", "cohort", "median round (s)", "state bytes / client"]
        rows = [[r["algorithm"], r["M"], r["cohort"], f"{r['median_round_s']:.4f}",
                 int(r["state_bytes_per_client"])] for r in result["round_times"]]
        lines += [_common.markdown_table(header, rows)]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
