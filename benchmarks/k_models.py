"""K-model personalized FL: FedFew and IFCA against the regularized baselines.

Two modes, both in ONE process, writing JSON under benchmarks/results/:

* comparison (default): Local, FedAvg, FedAvg-FT, IFCA, HypCluster, FedEM (K=3
  each), CFL (at most 3 clusters, the paper's eps1 = 0.4, eps2 = 1.6 and 20
  warm-up rounds), Ditto, APFL and FedFew (K=3; `server` and `local`
  evaluation protocols from the same run),
  3 seeds, on two settings that need no network:
  (i)  "latent clusters": the 5,000-image MNIST subset split IID over 100
       clients in 3 hidden groups; group g relabels y -> perm_g(y) with its own
       fixed permutation (group 0: identity), the IFCA paper's setting;
  (ii) "label skew": the same images, Dirichlet(0.1) over 20 clients (the
       split the FedFew code actually uses).
  Every client is split 75/25 into train/test. Metrics after every
  `eval_every` rounds: sample-weighted and unweighted accuracy (best over
  evaluations and final), worst client and std over clients (final), and for
  K-model methods on (i) the adjusted Rand index of the client -> model
  assignment against the hidden groups.
* `--speed`: FedAvg, FedFew (K=3) and IFCA (K=3) rounds timed side by side on
  the round_speed workload (Synthetic(1,1), every client 64 examples, MLP
  60-64-10, 5 local steps of batch 32, full participation), interleaved round
  by round; prints FedFew / (K x FedAvg) against the <= 1.3 target.
* `--memory`: XLA's memory analysis of the COMPILED FedFew round (nothing
  runs; inputs are shapes only), the streamed round against the dense
  reference it replaced (`algorithms._fedfew_dense`, every client's K deltas
  kept: O(S K d)), on the speed workload at M = S = `--clients`.

  python benchmarks/k_models.py                      # comparison, ~15 min on 2 cores
  python benchmarks/k_models.py --speed --clients 1000 --rounds 15
  python benchmarks/k_models.py --quick --out /tmp/k.json    # smoke test
  python benchmarks/k_models.py --memory --clients 2000 --execution chunked
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common as C  # noqa: E402

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
SPEED = dict(examples=64, features=60, classes=10, hidden=64, local_steps=5, batch_size=32,
             lr=0.05)
SETTINGS = {  # rounds, eval_every, local schedule, lr, hidden units
    "latent_clusters": dict(clients=100, rounds=100, eval_every=10, batch_size=10,
                            local_epochs=1, lr=0.05, hidden=(64,)),
    "label_skew": dict(clients=20, rounds=50, eval_every=5, batch_size=32, local_epochs=1,
                       lr=0.05, hidden=(64,)),
}
METHODS = ("local", "fedavg", "fedavg_ft", "ifca", "hypcluster", "fedem", "cfl", "ditto", "apfl",
           "fedfew")
EXTRA_METHODS = ("fedfew_mu1e-3",)  # on request (--methods): FedFew with a colder mu


# --------------------------------------------------------------------------- data

def latent_clusters(seed: int, num_clients: int = 100, groups: int = 3):
    """MNIST subset, IID over clients; client i is in group i % groups, whose labels
    are permuted by a fixed permutation (group 0 keeps the true labels)."""
    import fedjax_pfl as fp
    from fedjax_pfl.data import partition

    x, y = fp.data.datasets.load_mnist_subset()
    rng = np.random.default_rng(seed)
    perms = [np.arange(10)] + [rng.permutation(10) for _ in range(groups - 1)]
    parts = partition.iid(y, num_clients, seed=seed)
    train_idx, test_idx = partition.train_test_split(parts, seed=seed + 1)
    group = np.arange(num_clients) % groups

    def build(indices):
        return fp.ClientData.from_clients(
            [{"x": x[i], "y": perms[group[c]][y[i]].astype(np.int32)}
             for c, i in enumerate(indices)], num_classes=10)

    return build(train_idx), build(test_idx), group


def label_skew(seed: int, num_clients: int = 20):
    import fedjax_pfl as fp

    train, test, _ = fp.data.federated_dataset("mnist", num_clients=num_clients,
                                               partition="dirichlet", alpha=0.1, seed=seed)
    return train, test, None


# --------------------------------------------------------------------------- comparison

def make_algorithms(model, cfg) -> dict:
    """name -> (algorithm, {protocol name: evaluate fn})."""
    from fedjax_pfl import algorithms as A

    sched = dict(batch_size=cfg["batch_size"], local_epochs=cfg["local_epochs"],
                 client_lr=cfg["lr"])
    out = {
        "local": A.local_only(model, **sched),
        "fedavg": A.fedavg(model, **sched),
        "fedavg_ft": A.fedavg_ft(model, ft_epochs=1, ft_batch_size=cfg["batch_size"],
                                 ft_lr=cfg["lr"], **sched),
        "ifca": A.ifca(model, num_models=3, **sched),
        "hypcluster": A.hypcluster(model, num_models=3, **sched),
        "fedem": A.fedem(model, num_models=3, **sched),
        "cfl": A.cfl(model, max_clusters=3, **sched),
        "ditto": A.ditto(model, lam=0.1, **sched),
        "apfl": A.apfl(model, alpha=0.5, **sched),
    }
    out = {k: (v, {k: v.evaluate}) for k, v in out.items()}
    few = A.fedfew(model, num_models=3, mu=0.01, **sched)
    few_local = A.fedfew(model, num_models=3, mu=0.01, eval_protocol="local", **sched)
    out["fedfew"] = (few, {"fedfew (server)": few.evaluate, "fedfew (local)": few_local.evaluate})
    cold = A.fedfew(model, num_models=3, mu=1e-3, **sched)
    cold_local = A.fedfew(model, num_models=3, mu=1e-3, eval_protocol="local", **sched)
    out["fedfew_mu1e-3"] = (cold, {"fedfew mu=1e-3 (server)": cold.evaluate,
                                   "fedfew mu=1e-3 (local)": cold_local.evaluate})
    return out


def compiled(algo, evaluators) -> tuple:
    """(jitted block of rounds, jitted init, {protocol: jitted evaluate}), built once per
    method so that seeds with the same data shapes reuse the executables."""
    import jax

    from fedjax_pfl.simulate import run_rounds

    block = jax.jit(functools.partial(run_rounds, algo.round), static_argnames="num_rounds")
    return block, jax.jit(algo.init), {name: jax.jit(fn) for name, fn in evaluators.items()}


def run_one(fns, train, test, cfg, seed, groups=None) -> dict:
    """Trains one method; returns {protocol: [summary per evaluation]} and the time."""
    import jax

    from fedjax_pfl import metrics
    from fedjax_pfl.simulate import seed_keys

    block, init, evals = fns
    init_key, round_key = seed_keys(seed)
    state = init(init_key, train)
    history = {name: [] for name in evals}
    t0 = time.perf_counter()
    for _ in range(cfg["rounds"] // cfg["eval_every"]):
        state, m = block(state, train, round_key, num_rounds=cfg["eval_every"])
        for name, fn in evals.items():
            per = jax.device_get(fn(state, train, test))
            row = {"round": int(state.round), "train_loss": float(np.mean(m["train_loss"])),
                   **metrics.summarize(per)}
            if "model" in per:
                row["models_used"] = int(len(np.unique(np.asarray(per["model"]))))
                if groups is not None:
                    from sklearn.metrics import adjusted_rand_score
                    row["ari"] = float(adjusted_rand_score(groups, np.asarray(per["model"])))
            history[name].append(row)
    return {"history": history, "seconds": time.perf_counter() - t0}


def summarize_runs(runs: list[dict]) -> dict:
    """Mean and std over seeds of the table's columns (runs: one history per seed)."""
    cols = {
        "acc_w_best": lambda h: max(e["acc_weighted"] for e in h),
        "acc_w_final": lambda h: h[-1]["acc_weighted"],
        "acc_u_best": lambda h: max(e["acc_mean"] for e in h),
        "acc_u_final": lambda h: h[-1]["acc_mean"],
        "worst_final": lambda h: h[-1]["acc_min"],
        "std_final": lambda h: h[-1]["acc_std"],
        "ari_final": lambda h: h[-1].get("ari", float("nan")),
    }
    out = {}
    for name, fn in cols.items():
        vals = np.array([fn(h) for h in runs], np.float64)
        out[name] = [float(np.mean(vals)), float(np.std(vals))]
    return out


def comparison(seeds, settings, methods, quick=False) -> dict:
    from fedjax_pfl import models

    results = {}
    for setting in settings:
        cfg = dict(SETTINGS[setting])
        if quick:
            cfg.update(rounds=4, eval_every=2)
        results[setting] = {"config": cfg, "runs": {}}
        model = models.mlp((784,), 10, hidden=cfg["hidden"])
        algos = {name: compiled(*spec) for name, spec in make_algorithms(model, cfg).items()}
        for seed in seeds:
            train, test, groups = (latent_clusters if setting == "latent_clusters"
                                   else label_skew)(seed)
            for name in methods:
                out = run_one(algos[name], train, test, cfg, seed, groups)
                for protocol, history in out["history"].items():
                    results[setting]["runs"].setdefault(protocol, []).append(
                        {"seed": seed, "history": history, "seconds": out["seconds"]})
                last = {p: h[-1]["acc_weighted"] for p, h in out["history"].items()}
                print(f"{setting} seed={seed} {name}: {last} ({out['seconds']:.1f}s)", flush=True)
        results[setting]["table"] = {
            p: summarize_runs([r["history"] for r in runs])
            for p, runs in results[setting]["runs"].items()}
    return results


def comparison_markdown(results) -> str:
    header = ["method", "acc (w) best", "acc (w) final", "acc (u) best", "acc (u) final",
              "worst client", "std", "ARI"]
    text = []
    for setting, res in results.items():
        cfg = res["config"]
        text.append(f"**{setting}** ({cfg['clients']} clients, {cfg['rounds']} rounds, "
                    f"E={cfg['local_epochs']}, B={cfg['batch_size']}, lr={cfg['lr']}, MLP "
                    f"784-{'-'.join(map(str, cfg['hidden']))}-10; mean ± std over seeds)\n")
        rows = []
        for method, table in res["table"].items():
            cell = lambda c, t=table: ("-" if np.isnan(t[c][0])
                                       else f"{t[c][0]:.3f} ± {t[c][1]:.3f}")
            rows.append([method] + [cell(c) for c in ("acc_w_best", "acc_w_final", "acc_u_best",
                                                      "acc_u_final", "worst_final", "std_final",
                                                      "ari_final")])
        text.append(C.markdown_table(header, rows) + "\n")
    return "\n".join(text)


# --------------------------------------------------------------------------- speed

def speed_data(num_clients: int, seed: int = 0):
    """`num_clients` Synthetic(1,1) clients with exactly 64 examples each (round_speed's)."""
    import fedjax_pfl as fp
    from fedjax_pfl.data.datasets import synthetic

    n, k = SPEED["examples"], int(num_clients * 1.5) + 16
    while True:
        full = [c for c in synthetic(1.0, 1.0, k, seed=seed, max_examples_per_client=n)
                if len(c["y"]) == n]
        if len(full) >= num_clients:
            break
        k *= 2
    return fp.ClientData(examples={"x": np.stack([c["x"] for c in full[:num_clients]]),
                                   "y": np.stack([c["y"] for c in full[:num_clients]])},
                         num_examples=np.full((num_clients,), n, np.int32))


def speed_rows(num_clients: int = 1000, *, rounds: int = 10, num_models: int = 3,
               execution: str = "vmap", seed: int = 0) -> list[dict]:
    """Median jitted-round time of FedAvg, FedFew (K) and IFCA (K), measured side by side.

    The algorithms take turns round by round (after a compile and a warm-up
    round each) so that load from other processes hits all of them alike.

    Returns:
      one dict per algorithm: algorithm, M, K, round_s (median), round_times,
      vs_fedavg (time ratio) and vs_k_fedavg (time / (K x FedAvg's)).
    """
    import jax

    import fedjax_pfl as fp
    from fedjax_pfl import algorithms as A

    train = jax.device_put(speed_data(num_clients, seed))
    model = fp.models.mlp((SPEED["features"],), SPEED["classes"], hidden=(SPEED["hidden"],))
    sched = dict(batch_size=SPEED["batch_size"], local_steps=SPEED["local_steps"],
                 client_lr=SPEED["lr"], execution=execution)
    algos = {"fedavg": A.fedavg(model, **sched),
             f"fedfew (K={num_models})": A.fedfew(model, num_models=num_models, **sched),
             f"ifca (K={num_models})": A.ifca(model, num_models=num_models, **sched)}
    keys = [jax.random.fold_in(jax.random.key(seed + 1), r) for r in range(rounds + 1)]
    states, fns, compile_s, times = {}, {}, {}, {name: [] for name in algos}
    for name, algo in algos.items():
        states[name] = jax.jit(algo.init)(jax.random.key(seed), train)
        t0 = time.perf_counter()
        fns[name] = jax.jit(algo.round).lower(states[name], train, keys[0]).compile()
        compile_s[name] = time.perf_counter() - t0
        states[name], _ = jax.block_until_ready(fns[name](states[name], train, keys[0]))
    for r in range(1, rounds + 1):
        for name in algos:
            t0 = time.perf_counter()
            states[name], _ = jax.block_until_ready(fns[name](states[name], train, keys[r]))
            times[name].append(time.perf_counter() - t0)
    base = C.median(times["fedavg"])
    rows = []
    for name in algos:
        t = C.median(times[name])
        k = 1 if name == "fedavg" else num_models
        rows.append(dict(algorithm=name, M=num_clients, K=k, execution=execution, round_s=t,
                         round_times=times[name], compile_s=compile_s[name],
                         vs_fedavg=t / base, vs_k_fedavg=t / (k * base)))
    return rows


# --------------------------------------------------------------------------- memory

def memory_rows(num_clients: int = 2000, *, num_models: int = 3, execution: str = "chunked",
                hidden: int = SPEED["hidden"]) -> list[dict]:
    """Compiled memory of the FedFew round, streamed vs dense (shapes only, no run).

    Returns:
      one dict per variant: variant, M, K, d (params per model), execution,
      temp_bytes, argument_bytes, output_bytes, total_bytes (argument + output +
      temp: XLA:CPU reports no peak of its own), deltas_bytes (S K d x 4). The
      dense reference returns the new params only, the round the whole state.
    """
    import jax
    import jax.numpy as jnp

    import fedjax_pfl as fp
    from fedjax_pfl import algorithms as A
    from fedjax_pfl.algorithms._fedfew_dense import dense_fedfew_round

    n, f = SPEED["examples"], SPEED["features"]
    shape = jax.ShapeDtypeStruct
    train = fp.ClientData(examples={"x": shape((num_clients, n, f), jnp.float32),
                                    "y": shape((num_clients, n), jnp.int32)},
                          num_examples=shape((num_clients,), jnp.int32))
    model = fp.models.mlp((f,), SPEED["classes"], hidden=(hidden,))
    cfg = dict(num_models=num_models, batch_size=SPEED["batch_size"],
               local_steps=SPEED["local_steps"], client_lr=SPEED["lr"], execution=execution)
    algo = A.fedfew(model, **cfg)
    key = jax.eval_shape(lambda: jax.random.key(0))
    state = jax.eval_shape(algo.init, key, train)
    d = sum(int(np.prod(a.shape[1:])) for a in jax.tree.leaves(state.params))
    rows = []
    for variant, fn in (("dense (before)", dense_fedfew_round(model, **cfg)),
                        ("streamed (after)", algo.round)):
        mem = jax.jit(fn).lower(state, train, key).compile().memory_analysis()
        temp, arg, out = (int(getattr(mem, a)) for a in (
            "temp_size_in_bytes", "argument_size_in_bytes", "output_size_in_bytes"))
        rows.append(dict(variant=variant, M=num_clients, K=num_models, d=d, execution=execution,
                         temp_bytes=temp, argument_bytes=arg, output_bytes=out,
                         total_bytes=arg + out + temp,
                         deltas_bytes=num_clients * num_models * d * 4))
    return rows


# --------------------------------------------------------------------------- main

def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--speed", action="store_true", help="time rounds instead of comparing")
    p.add_argument("--memory", action="store_true",
                   help="compiled memory of FedFew's round, streamed vs dense")
    p.add_argument("--clients", type=int, default=1000, help="M for --speed / --memory")
    p.add_argument("--rounds", type=int, default=15, help="timed rounds for --speed")
    p.add_argument("--execution", default=None,
                   help="strategy for --speed (default vmap) / --memory (default chunked)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    p.add_argument("--methods", nargs="+", default=list(METHODS),
                   choices=list(METHODS + EXTRA_METHODS))
    p.add_argument("--quick", action="store_true", help="a few rounds only (smoke test)")
    p.add_argument("--out", default=None, help="JSON path (default: benchmarks/results/...)")
    args = p.parse_args(argv)
    record = dict(hardware=C.hardware(), versions=C.versions(), argv=sys.argv[1:],
                  started=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    if args.memory:
        rows = memory_rows(args.clients, execution=args.execution or "chunked")
        record.update(mode="memory", workload=SPEED, rows=rows)
        mib = lambda b: b / 2**20
        print(C.markdown_table(
            ["variant", "M=S", "K", "d", "execution", "temp (MiB)", "arg+out+temp (MiB)",
             "S K d deltas (MiB)"],
            [[r["variant"], r["M"], r["K"], r["d"], r["execution"], mib(r["temp_bytes"]),
              mib(r["total_bytes"]), mib(r["deltas_bytes"])] for r in rows]))
        out = args.out or os.path.join(RESULTS, f"k_models_memory_M{args.clients}.json")
    elif args.speed:
        rows = speed_rows(args.clients, rounds=args.rounds, execution=args.execution or "vmap")
        few = next(r for r in rows if r["algorithm"].startswith("fedfew"))
        record.update(mode="speed", workload=SPEED, rows=rows,
                      target={"fedfew_vs_k_fedavg_max": 1.3,
                              "met": few["vs_k_fedavg"] <= 1.3})
        print(C.markdown_table(
            ["algorithm", "M", "round (s, median)", "vs FedAvg", "vs K x FedAvg", "compile (s)"],
            [[r["algorithm"], r["M"], r["round_s"], r["vs_fedavg"], r["vs_k_fedavg"],
              r["compile_s"]] for r in rows]))
        print(f"FedFew / (K x FedAvg) = {few['vs_k_fedavg']:.3f} (target <= 1.3: "
              f"{'met' if record['target']['met'] else 'MISSED'})")
        out = args.out or os.path.join(RESULTS, f"k_models_speed_M{args.clients}.json")
    else:
        results = comparison(args.seeds, args.settings, args.methods, args.quick)
        record.update(mode="comparison", seeds=args.seeds, results=results)
        print(comparison_markdown(results))
        out = args.out or os.path.join(RESULTS, "k_models.json")
    C.write_json(out, record)


if __name__ == "__main__":
    main()
