"""FedAvg round time vs the number of clients M, for every execution strategy.

Workload: M Synthetic(1, 1) clients with exactly 64 examples each (--examples n:
n each, batch min(32, n)), MLP 60-64-10,
FedAvg with full participation, 5 local SGD steps of batch 32, lr 0.05, weights
n_i. `synthetic(1, 1, K, max_examples_per_client=64)` caps sizes at 64, but its
sizes start at 50, so ~25 % of clients have < 64 rows: those are dropped (K
grows until M full clients exist; the first M are kept).

Variants, each in a FRESH process per configuration and repeat:
  (a) the package's round, `fedavg(..., execution=Execution(strategy, chunk))`
      for vmap / chunked / sharded (2 host devices) / sharded + chunked, timed
      per `jax.jit(algo.round)` call ("round") and as `run_rounds` over R rounds
      / R ("scan"). All JAX processes use `use_cpu_devices(2)` except "vmap (1 dev)".
  (b) "loop": Python loop over clients, one jitted call per client (`local_train`
      + weighted accumulation), one jitted finalize per round.
  (c) "torch": PFLlib-style PyTorch loop (deep-copied client models,
      set_parameters, shuffled DataLoader, fresh SGD, 5 steps, per-parameter
      n_i-weighted aggregation; 1 thread by default); skipped without torch.
Per run: warm-up rounds excluded (a 2nd one for JAX: "sharded" re-compiles on
its 2nd call, reported as recompile_s), median over R rounds, AOT compile time
(`.lower().compile()`), CPU s per round, peak RSS, cores (CPU time / wall) and others (CPU used
by other processes meanwhile: noise). --repeats N reports medians over N
interleaved runs. Correctness: after one round from the same init and keys the
params of every vectorized run must match the loop's to < 1e-5.

  python benchmarks/round_speed.py --repeats 3 --wait-quiet 30   # committed JSON
  python benchmarks/round_speed.py --quick --out /tmp/x.json     # smoke test, < 60 s
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import subprocess
import sys
import tempfile

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common as C  # noqa: E402

N_EXAMPLES, FEATURES, CLASSES, HIDDEN = 64, 60, 10, 64
LOCAL_STEPS, BATCH, LR, SEED = 5, 32, 0.05, 0
DEFAULT_OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                           "round_speed_cpu.json")
TARGETS = {"vs_torch_min": 50.0, "vs_loop_min": 2.0, "compile_max_s": 5.0, "peak_rss_max_mb": 800.0}
FIELDS = ("round_s", "scan_s", "cpu_s", "compile_s", "recompile_s", "compile_scan_s",
          "first_call_s", "peak_rss_mb", "cores", "scan_cores", "others", "train_loss")


def rounds_for(m: int, kind: str, quick: bool) -> int:
    if quick:
        return 3
    if kind == "torch":
        return 20 if m <= 100 else 5 if m <= 1000 else 2
    return 20 if m <= 100 else 10 if m <= 1000 else 5


def configurations(chunks, torch_ok: bool) -> list[dict]:
    jax_cfg = lambda name, strategy, chunk=None, devices=2: dict(
        name=name, kind="jax", strategy=strategy, chunk=chunk, devices=devices)
    cfgs = [jax_cfg("vmap (1 dev)", "vmap", devices=1), jax_cfg("vmap", "vmap")]
    cfgs += [jax_cfg(f"chunked {c}", "chunked", c) for c in chunks]
    cfgs += [jax_cfg("sharded", "sharded")]
    cfgs += [jax_cfg(f"sharded+chunk {c}", "sharded", c) for c in chunks]
    cfgs += [dict(name="loop", kind="loop", strategy=None, chunk=None, devices=2)]
    if torch_ok:
        cfgs += [dict(name="torch", kind="torch", strategy=None, chunk=None, devices=None)]
    return cfgs


def make_data(m: int, path: str, n: int = N_EXAMPLES) -> None:
    """M Synthetic(1,1) clients with exactly n rows each, saved as .npz."""
    from fedjax_pfl.data.datasets import synthetic

    k = m if n <= 50 else int(m * 1.5) + 16  # its sizes start at 50: n <= 50 keeps all
    while True:
        full = [c for c in synthetic(1.0, 1.0, k, seed=SEED, max_examples_per_client=n)
                if len(c["y"]) == n]
        if len(full) >= m:
            break
        k *= 2
    np.savez(path, x=np.stack([c["x"] for c in full[:m]]), y=np.stack([c["y"] for c in full[:m]]))


def params_path(spec: dict) -> str:
    """Where a run saves its params after the first round (correctness probe)."""
    name = spec["name"].replace(" ", "_").replace("(", "").replace(")", "")
    return os.path.join(spec["tmp"], f"params_{spec['M']}_{name}_{spec['repeat']}.npy")


# =========================================================================== workers

def _jax_setup(cfg):
    import fedjax_pfl as fp

    fp.use_cpu_devices(cfg["devices"])  # before JAX creates any array
    import jax

    from fedjax_pfl.models.zoo import mlp
    from fedjax_pfl.simulate import seed_keys

    d = np.load(cfg["data"])  # every client has exactly cfg["n"] rows (see make_data)
    train = fp.ClientData(examples={"x": d["x"], "y": d["y"]},
                          num_examples=np.full((d["y"].shape[0],), cfg["n"], np.int32))
    # Straight from NumPy to the final placement (one device copy of the data set).
    train = fp.shard_clients(train) if cfg["strategy"] == "sharded" else jax.device_put(train)
    init_key, seed_key = seed_keys(SEED)
    keys = [jax.random.fold_in(seed_key, r) for r in range(cfg["rounds"] + 2)]
    return fp, jax, train, mlp((FEATURES,), CLASSES, hidden=(HIDDEN,)), init_key, seed_key, keys


def _save_params(jax, cfg, params) -> None:
    np.save(params_path(cfg), np.concatenate([np.ravel(x) for x in jax.tree.leaves(params)]))


def worker_jax(cfg) -> dict:
    fp, jax, train, model, init_key, seed_key, keys = _jax_setup(cfg)
    from fedjax_pfl.algorithms.fedavg import fedavg

    algo = fedavg(model, batch_size=cfg["batch"], local_steps=LOCAL_STEPS, client_lr=LR,
                  execution=fp.Execution(cfg["strategy"], cfg["chunk"]))
    state = jax.jit(algo.init)(init_key, train)  # eager flax init = dozens of op compiles
    round_jit = jax.jit(algo.round)
    with C.Meter() as comp:  # the jit calls below reuse this executable
        round_jit.lower(state, train, keys[0]).compile()
    with C.Meter() as first:  # warm-up round = the correctness probe
        state, metrics = jax.block_until_ready(round_jit(state, train, keys[0]))
    _save_params(jax, cfg, state.params)
    # A 2nd warm-up round: with "sharded" the state leaves init on one device but the
    # round returns it replicated over the mesh, so the 2nd call re-traces and re-compiles.
    with C.Meter() as second:
        state, metrics = jax.block_until_ready(round_jit(state, train, keys[1]))
    ks = iter(keys[2:])

    def one_round():
        nonlocal state, metrics
        state, metrics = round_jit(state, train, next(ks))
        return state

    times, meter, _ = C.time_calls(one_round, cfg["rounds"], jax.block_until_ready)
    out = dict(round_s=C.median(times), round_times=times, cores=meter.cores, others=meter.others,
               cpu_s=meter.cpu / cfg["rounds"], compile_s=comp.wall, first_call_s=first.wall,
               recompile_s=max(0.0, second.wall - C.median(times)),
               train_loss=float(metrics["train_loss"]))
    # The package's driver: R rounds as one lax.scan; per-round time = call time / R.
    r = cfg["rounds"]
    scan_jit = jax.jit(functools.partial(fp.run_rounds, algo.round), static_argnames="num_rounds")
    with C.Meter() as scan_comp:
        scan_jit.lower(state, train, seed_key, num_rounds=r).compile()
    run = lambda: scan_jit(state, train, seed_key, num_rounds=r)
    jax.block_until_ready(run())  # warm-up
    scan_times, scan_meter, _ = C.time_calls(run, 3 if cfg["M"] * r <= 20000 else 1,
                                             jax.block_until_ready)
    return dict(out, scan_s=C.median(scan_times) / r, scan_cores=scan_meter.cores,
                scan_others=scan_meter.others, compile_scan_s=scan_comp.wall)


def worker_loop(cfg) -> dict:
    fp, jax, train, model, init_key, seed_key, keys = _jax_setup(cfg)
    import jax.numpy as jnp
    import optax

    from fedjax_pfl.core import local, sampling

    loss_fn, m = local.model_loss_fn(model), train.num_clients
    xs = [train.examples["x"][i] for i in range(m)]  # pre-split device arrays (outside timing)
    ys = [train.examples["y"][i] for i in range(m)]
    ids, n = [np.int32(i) for i in range(m)], np.int32(cfg["n"])

    @functools.partial(jax.jit, donate_argnums=0)
    def client_step(acc, params, client_key, cid, x, y, num):
        data = fp.ClientData(examples={"x": x, "y": y}, num_examples=num)
        res = local.local_train(params, data, jax.random.fold_in(client_key, cid), loss_fn=loss_fn,
                                optimizer=optax.sgd(LR), batch_size=cfg["batch"],
                                local_steps=LOCAL_STEPS)
        w, (delta, w_sum, loss_sum) = num.astype(jnp.float32), acc
        delta = jax.tree.map(lambda a, c, s: a + w * (c - s), delta, res.params, params)
        return delta, w_sum + w, loss_sum + w * res.mean_loss()

    @jax.jit
    def start(params, key):  # the round's client-key base, as in fedavg's round
        zeros = jax.tree.map(jnp.zeros_like, params)
        return sampling.round_keys(key)[1], (zeros, jnp.zeros(()), jnp.zeros(()))

    @jax.jit
    def finish(params, acc):
        delta, w_sum, loss_sum = acc
        return jax.tree.map(lambda p, d: p + d / w_sum, params, delta), loss_sum / w_sum

    params = jax.jit(model.init)(init_key)

    def one_round(key):
        nonlocal params
        client_key, acc = start(params, key)
        for i in range(m):
            acc = client_step(acc, params, client_key, ids[i], xs[i], ys[i], n)
        params, loss = finish(params, acc)
        return params, loss

    with C.Meter() as comp:
        client_key, acc = start(params, keys[0])
        client_step.lower(acc, params, client_key, ids[0], xs[0], ys[0], n).compile()
    with C.Meter() as first:
        jax.block_until_ready(one_round(keys[0]))
    _save_params(jax, cfg, params)
    ks = iter(keys[1:])
    times, meter, (_, loss) = C.time_calls(lambda: one_round(next(ks)), cfg["rounds"],
                                           jax.block_until_ready)
    return dict(round_s=C.median(times), round_times=times, cores=meter.cores, others=meter.others,
                cpu_s=meter.cpu / cfg["rounds"],
                compile_s=comp.wall, first_call_s=first.wall, train_loss=float(loss))


def worker_torch(cfg) -> dict:
    import torch

    torch.manual_seed(SEED)
    torch.set_num_threads(cfg["torch_threads"])
    d = np.load(cfg["data"])
    sim = C.PfllibFedAvg(d["x"], d["y"], C.torch_mlp(FEATURES, (HIDDEN,), CLASSES),
                         batch_size=cfg["batch"], lr=LR, local_steps=LOCAL_STEPS)
    sim.round()  # warm-up
    times, meter, loss = C.time_calls(sim.round, cfg["rounds"])
    return dict(round_s=C.median(times), round_times=times, cores=meter.cores, others=meter.others,
                cpu_s=meter.cpu / cfg["rounds"],
                train_loss=loss, torch_threads=torch.get_num_threads())


def worker_main(cfg: dict) -> None:
    out = {"jax": worker_jax, "loop": worker_loop, "torch": worker_torch}[cfg["kind"]](cfg)
    C.emit(dict(out, peak_rss_mb=C.peak_rss_mb()))


# =========================================================================== driver

def headline(rows: list[dict], ms: list[int]) -> list[dict]:
    """Per M: the fastest vectorized configuration (jit round, and scan) vs (b) and (c)."""
    ratio = lambda a, b: a / b if a and b else None
    out = []
    for m in ms:
        at = {r["name"]: r for r in rows if r["M"] == m and r["round_s"] is not None}
        vec = [r for r in at.values() if r["kind"] == "jax"]
        if not vec:
            continue
        best, scan = min(vec, key=lambda r: r["round_s"]), min(vec, key=lambda r: r["scan_s"])
        loop, torch = at.get("loop", {}).get("round_s"), at.get("torch", {}).get("round_s")
        out.append(dict(M=m, best=best["name"], best_round_s=best["round_s"],
                        best_scan=scan["name"], best_scan_s=scan["scan_s"], loop_s=loop,
                        torch_s=torch, best_vs_torch=ratio(torch, best["round_s"]),
                        best_vs_loop=ratio(loop, best["round_s"]),
                        scan_vs_torch=ratio(torch, scan["scan_s"]),
                        scan_vs_loop=ratio(loop, scan["scan_s"]),
                        best_compile_s=best["compile_s"], best_peak_rss_mb=best["peak_rss_mb"]))
    return out


def check_targets(rows, heads) -> dict:
    """The issue's targets at the largest M (compile: every vectorized row, every M)."""
    if not heads:
        return {}
    h = heads[-1]
    vec = [r for r in rows if r["kind"] == "jax" and r["compile_s"] is not None]
    comp = {r["M"]: r["compile_s"] for r in vec if r["name"] == h["best"]}
    ok = lambda x, t, ge=True: None if x is None else (x >= t if ge else x <= t)
    return {"M": h["M"], "best": h["best"],
            "best_vs_torch>=50": ok(h["best_vs_torch"], TARGETS["vs_torch_min"]),
            "best_vs_loop>=2": ok(h["best_vs_loop"], TARGETS["vs_loop_min"]),
            "compile_s_max_all_vectorized": max((r["compile_s"] for r in vec), default=None),
            "compile<5s": all(r["compile_s"] < TARGETS["compile_max_s"] for r in vec),
            "compile_plus_recompile_s_max": max((r["compile_s"] + (r["recompile_s"] or 0)
                                                 for r in vec), default=None),
            "best_compile_s_by_M": comp,
            "compile_flat_in_M(max/min<2)":
                bool(comp) and max(comp.values()) < 2 * min(comp.values()),
            "best_peak_rss_mb": h["best_peak_rss_mb"],
            "peak_rss<=800MB": ok(h["best_peak_rss_mb"], TARGETS["peak_rss_max_mb"], ge=False)}


def correctness(runs: list[dict]) -> tuple[dict, dict]:
    """Max |param diff| after the first round: each vectorized run vs the loop's (same repeat)."""
    diffs = {}
    for r in runs:
        ref = params_path(dict(r, name="loop"))
        if r["kind"] == "jax" and "error" not in r and os.path.exists(ref):
            d = float(np.max(np.abs(np.load(params_path(r)) - np.load(ref))))
            diffs[(r["M"], r["name"])] = max(d, diffs.get((r["M"], r["name"]), 0.0))
    worst = max(diffs.values()) if diffs else None
    return diffs, {"max_abs_param_diff_vs_loop": worst,
                   "pass(<1e-5)": worst is not None and worst < 1e-5}


def print_report(rows, heads, targets, correct) -> None:
    mm = lambda r: "..".join(C.fmt(x, 3) for x in r["round_s_min_max"] or ["-"])
    print("\n" + C.markdown_table(
        ["M", "config", "round s", "scan s/round", "round min..max", "CPU s/round", "compile s",
         "peak MB", "cores", "others", "max abs dp vs loop"],
        [[r["M"], r["name"], r["round_s"], r["scan_s"], mm(r), r["cpu_s"], r["compile_s"],
          r["peak_rss_mb"], r["cores"], r["others"], r["max_abs_diff_vs_loop"]] for r in rows]))
    print("\n" + C.markdown_table(
        ["M", "best (jit round)", "s", "best (scan)", "s/round", "loop (b) s", "torch (c) s",
         "best vs (c)", "best vs (b)", "scan vs (c)", "scan vs (b)"],
        [[h["M"], h["best"], h["best_round_s"], h["best_scan"], h["best_scan_s"], h["loop_s"],
          h["torch_s"], h["best_vs_torch"], h["best_vs_loop"], h["scan_vs_torch"],
          h["scan_vs_loop"]] for h in heads]))
    print("\ntargets: >= 50x vs (c) and >= 2x vs (b) at the largest M, compile < 5 s and flat "
          "in M, peak RSS <= 0.8 GB\n" + json.dumps(targets, indent=1, default=str))
    print("correctness:", json.dumps(correct))


def k_model_rows(num_clients: int, rounds: int) -> list[dict]:
    """FedFew / IFCA (K=3) vs FedAvg round times from `k_models.speed_rows`, in a fresh
    process (target: FedFew <= 1.3 x K x FedAvg)."""
    if num_clients <= 0:
        return []
    code = ("import json, k_models; print(json.dumps(k_models.speed_rows("
            f"{num_clients}, rounds={rounds})))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=os.path.dirname(os.path.abspath(__file__)), check=True)
    rows = json.loads(out.stdout.strip().splitlines()[-1])
    print(f"\nK-model rounds (M={num_clients}, one process, side by side):")
    for r in rows:
        print(f"  {r['algorithm']:<14} {r['round_s']:.4f} s  x FedAvg {r['vs_fedavg']:.2f}  "
              f"x (K FedAvg) {r.get('vs_k_fedavg') or float('nan'):.2f}")
    return [{k: v for k, v in r.items() if k != "round_times"} for r in rows]


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--clients", type=int, nargs="+", default=[100, 1000, 10000])
    p.add_argument("--chunks", type=int, nargs="+", default=[16, 32, 50, 64])
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--examples", type=int, default=N_EXAMPLES,
                   help="rows per client (batch = min(32, this))")
    p.add_argument("--no-loop", action="store_true",
                   help="skip the per-client loop (b), the correctness reference (large M)")
    p.add_argument("--quick", action="store_true", help="tiny sizes (smoke test, < 60 s)")
    p.add_argument("--only", nargs="*", help="only configurations whose name contains one of these")
    p.add_argument("--wait-quiet", type=float, default=0.0, metavar="S",
                   help="before each run wait up to S seconds for other processes to go idle")
    p.add_argument("--max-others", type=float, default=None, metavar="CORES",
                   help="re-run (up to --retries times) a run during which other processes "
                        "used more than CORES cores; the quietest attempt is kept")
    p.add_argument("--retries", type=int, default=2)
    p.add_argument("--torch-threads", type=int, default=1,
                   help="intra-op threads of the torch loop (1 is faster for this loop)")
    p.add_argument("--k-models-clients", type=int, default=1000, metavar="M",
                   help="also time FedFew (K=3) and IFCA (K=3) against FedAvg at M clients, side "
                        "by side in one fresh process (k_models.speed_rows); 0 skips")
    p.add_argument("--out", default=DEFAULT_OUT)
    p.add_argument("--worker", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.worker:
        return worker_main(json.loads(a.worker))
    if a.quick:
        a.clients, a.chunks = [32], [8]
    torch_ok = C.versions()["torch"] is not None
    if not torch_ok:
        print("note: torch is not installed; skipping the PyTorch loop (c).")
    cfgs = configurations(a.chunks, torch_ok)
    if a.quick:  # one configuration per worker kind (and shard_map + chunking) keeps it short
        cfgs = [c for c in cfgs if c["name"] in ("vmap", "sharded+chunk 8", "loop", "torch")]
    if a.only:  # the loop is the correctness reference: it runs unless --no-loop
        cfgs = [c for c in cfgs if c["kind"] == "loop" or any(s in c["name"] for s in a.only)]
    if a.no_loop:
        cfgs = [c for c in cfgs if c["kind"] != "loop"]
    batch = min(BATCH, a.examples)
    tmp = tempfile.mkdtemp(prefix="round_speed_")
    specs = []
    for m in a.clients:
        data = os.path.join(tmp, f"data_{m}.npz")
        make_data(m, data, a.examples)
        specs += [dict(c, M=m, label=f"M={m:<6} {c['name']:<18}", tmp=tmp, data=data,
                       rounds=rounds_for(m, c["kind"], a.quick), torch_threads=a.torch_threads,
                       n=a.examples, batch=batch)
                  for c in cfgs]
    describe = lambda r: (f"round {C.fmt(r['round_s'])} s  scan {C.fmt(r.get('scan_s'))} s  "
                          f"compile {C.fmt(r.get('compile_s'), 3)} s  "
                          f"rss {r['peak_rss_mb']:.0f} MB  cores {r['cores']:.2f}  "
                          f"others {r['others']:.2f}")
    runs = C.run_matrix(os.path.abspath(__file__), specs, a.repeats, a.wait_quiet, describe,
                        a.max_others, a.retries)
    diffs, correct = correctness(runs)
    by = ("name", "kind", "strategy", "chunk", "devices", "M", "rounds")
    rows = C.aggregate(runs, by, FIELDS)
    for r in rows:
        r["max_abs_diff_vs_loop"] = diffs.get((r["M"], r["name"]))
    heads = headline(rows, a.clients)
    targets = check_targets(rows, heads)
    print_report(rows, heads, targets, correct)
    k_rows = k_model_rows(32 if a.quick else a.k_models_clients, 3 if a.quick else 10)
    config = dict(clients=a.clients, chunks=a.chunks, repeats=a.repeats, quick=a.quick,
                  wait_quiet_s=a.wait_quiet, max_others=a.max_others, retries=a.retries,
                  examples_per_client=a.examples, model=f"MLP {FEATURES}-{HIDDEN}-{CLASSES}",
                  local_steps=LOCAL_STEPS, batch_size=batch, client_lr=LR, seed=SEED,
                  participation="full", torch_threads=a.torch_threads,
                  data=f"synthetic(1, 1, max_examples_per_client={a.examples}); clients with "
                       f"fewer rows dropped",
                  command="python benchmarks/round_speed.py " + " ".join(sys.argv[1:]))
    drop = ("data", "tmp", "label")
    C.write_json(a.out, dict(benchmark="round_speed", hardware=C.hardware(), versions=C.versions(),
                             config=config, correctness=correct, headline=heads,
                             targets=dict(TARGETS, **targets), rows=rows, k_models=k_rows,
                             runs=[{k: v for k, v in r.items() if k not in drop} for r in runs]))
    if any("error" in r for r in runs) or (not a.no_loop and not correct["pass(<1e-5)"]):
        sys.exit(1)


if __name__ == "__main__":
    main()
