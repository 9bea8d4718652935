"""FedAvg round time vs the number of clients M, for every execution strategy.

Workload (all variants): Synthetic(1, 1) clients with exactly 64 examples each,
MLP 60-64-10, FedAvg with full participation, 5 local SGD steps of batch 32,
lr 0.05, sample-weighted averaging. Data: `synthetic(1, 1, K, seed=0,
max_examples_per_client=64)` caps sizes at 64; its sizes are >= 50, so about a
quarter of the clients have fewer than 64 rows. Those are dropped: K grows
until M clients with exactly 64 rows exist and the first M are kept (the
stacked [M, 64, 60] arrays are what `ClientData.from_clients` would build).

Variants, each measured in a FRESH process (one per configuration and repeat):
  (a) the package's vectorized round, `fedavg(..., execution=Execution(...))`:
      vmap, chunked (several chunk sizes), sharded over 2 host devices and
      sharded + chunked. Timed as one `jax.jit(algo.round)` call per round
      ("round s") and as `run_rounds` (a `lax.scan` over R rounds) / R
      ("scan s"). All JAX processes use `use_cpu_devices(2)`; "vmap (1 dev)"
      is the same vmap round without it.
  (b) "loop": a Python loop over clients, one jitted call per client running
      `local_train` (5 steps) plus the weighted accumulation; one jitted
      finalize per round (the fair per-client JAX reference).
  (c) "torch": a PFLlib-style sequential PyTorch loop (per-client deep-copied
      model + set_parameters, shuffled DataLoader, fresh SGD, 5 steps, server
      aggregates parameter by parameter weighted by n_i). Skipped when torch is
      not installed.

Per configuration: one warm-up round (excluded), median over R timed rounds,
compile time (AOT `.lower().compile()` of the round / the scan / the client step), peak RSS, "cores"
(process CPU time / wall time over the timed rounds) and "others" (CPU used by
other processes meanwhile, a noise indicator). With --repeats N every
configuration runs N times (interleaved) and the medians of the per-run
medians are reported. Correctness: after one round from the same init, every
vectorized configuration's params are compared with the loop's.

Usage:
  python benchmarks/round_speed.py --repeats 3            # the committed JSON
  python benchmarks/round_speed.py --quick --out /tmp/x.json   # smoke test, < 60 s
"""

from __future__ import annotations

import argparse
import json
import os
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


def rounds_for(m: int, kind: str, quick: bool) -> int:
    if quick:
        return 3
    if kind == "torch":
        return 20 if m <= 100 else 5 if m <= 1000 else 2
    return 20 if m <= 100 else 10 if m <= 1000 else 5


def configurations(chunks, torch_ok: bool) -> list[dict]:
    cfgs = [dict(name="vmap (1 dev)", kind="jax", strategy="vmap", chunk=None, devices=1),
            dict(name="vmap", kind="jax", strategy="vmap", chunk=None, devices=2)]
    cfgs += [dict(name=f"chunked {c}", kind="jax", strategy="chunked", chunk=c, devices=2)
             for c in chunks]
    cfgs.append(dict(name="sharded", kind="jax", strategy="sharded", chunk=None, devices=2))
    cfgs += [dict(name=f"sharded+chunk {c}", kind="jax", strategy="sharded", chunk=c, devices=2)
             for c in chunks]
    cfgs.append(dict(name="loop", kind="loop", strategy=None, chunk=None, devices=2))
    if torch_ok:
        cfgs.append(dict(name="torch", kind="torch", strategy=None, chunk=None, devices=None))
    return cfgs


def make_data(m: int, path: str) -> None:
    """M Synthetic(1,1) clients with exactly N_EXAMPLES rows each, saved as .npz."""
    from fedjax_pfl.data.datasets import synthetic

    k = int(m * 1.5) + 16
    while True:
        clients = synthetic(1.0, 1.0, k, seed=SEED, max_examples_per_client=N_EXAMPLES)
        full = [c for c in clients if len(c["y"]) == N_EXAMPLES]
        if len(full) >= m:
            break
        k *= 2
    full = full[:m]
    np.savez(path, x=np.stack([c["x"] for c in full]), y=np.stack([c["y"] for c in full]),
             generated=k)


# =========================================================================== workers

def _jax_setup(cfg):
    import fedjax_pfl as fp

    fp.use_cpu_devices(cfg["devices"])
    import jax
    import jax.numpy as jnp
    from fedjax_pfl.models.zoo import mlp

    d = np.load(cfg["data"])  # every client has exactly N_EXAMPLES rows (see make_data)
    train = fp.ClientData(examples={"x": d["x"], "y": d["y"]},
                          num_examples=np.full((d["y"].shape[0],), N_EXAMPLES, np.int32))
    # Straight from NumPy to the final placement (one copy of the data set).
    train = fp.shard_clients(train) if cfg["strategy"] == "sharded" else jax.device_put(train)
    del d
    model = mlp((FEATURES,), CLASSES, hidden=(HIDDEN,))
    from fedjax_pfl.simulate import seed_keys

    init_key, seed_key = seed_keys(SEED)
    keys = [jax.random.fold_in(seed_key, r) for r in range(cfg["rounds"] + 1)]
    return fp, jax, jnp, train, model, init_key, seed_key, keys


def _flat(jax, params):
    return np.concatenate([np.ravel(np.asarray(leaf)) for leaf in jax.tree.leaves(params)])


def worker_jax(cfg) -> dict:
    fp, jax, jnp, train, model, init_key, seed_key, keys = _jax_setup(cfg)
    import functools

    from fedjax_pfl.algorithms.fedavg import fedavg

    algo = fedavg(model, batch_size=BATCH, local_steps=LOCAL_STEPS, client_lr=LR,
                  execution=fp.Execution(cfg["strategy"], cfg["chunk"]))
    state = jax.jit(algo.init)(init_key, train)  # eager flax init = dozens of op compiles
    round_jit = jax.jit(algo.round)
    # Compile time = AOT lower + compile (the jit call below reuses the executable).
    with C.Meter() as comp:
        round_jit.lower(state, train, keys[0]).compile()
    # Warm-up round (first execution); its params are the correctness probe.
    with C.Meter() as first:
        state, metrics = jax.block_until_ready(round_jit(state, train, keys[0]))
    np.save(cfg["params_out"], _flat(jax, state.params))
    ks = iter(keys[1:])

    def one_round():
        nonlocal state, metrics
        state, metrics = round_jit(state, train, next(ks))
        return state

    times, meter, _ = C.time_calls(one_round, cfg["rounds"], jax.block_until_ready)
    out = dict(round_s=C.median(times), round_times=times, cores=meter.cores, others=meter.others,
               compile_s=comp.wall, first_call_s=first.wall, train_loss=float(metrics["train_loss"]))
    # The package's driver: R rounds as one lax.scan; per-round time = call time / R.
    r = cfg["rounds"]
    scan_jit = jax.jit(functools.partial(fp.run_rounds, algo.round), static_argnames="num_rounds")
    with C.Meter() as scan_comp:
        scan_jit.lower(state, train, seed_key, num_rounds=r).compile()
    run = lambda: scan_jit(state, train, seed_key, num_rounds=r)
    jax.block_until_ready(run())  # warm-up
    scan_times, scan_meter, _ = C.time_calls(run, 3 if cfg["M"] * r <= 20000 else 1,
                                             jax.block_until_ready)
    out.update(scan_s=C.median(scan_times) / r, scan_cores=scan_meter.cores,
               scan_others=scan_meter.others, compile_scan_s=scan_comp.wall)
    return out


def worker_loop(cfg) -> dict:
    fp, jax, jnp, train, model, init_key, seed_key, keys = _jax_setup(cfg)
    import optax

    from fedjax_pfl.core import local, sampling

    loss_fn = local.model_loss_fn(model)
    m = train.num_clients
    xs = [train.examples["x"][i] for i in range(m)]  # pre-split device arrays (outside timing)
    ys = [train.examples["y"][i] for i in range(m)]
    ids = [np.int32(i) for i in range(m)]
    n = np.int32(N_EXAMPLES)

    def client_step(acc, params, client_key, cid, x, y, num):
        data = fp.ClientData(examples={"x": x, "y": y}, num_examples=num)
        res = local.local_train(params, data, jax.random.fold_in(client_key, cid), loss_fn=loss_fn,
                                optimizer=optax.sgd(LR), batch_size=BATCH, local_steps=LOCAL_STEPS)
        w = num.astype(jnp.float32)
        delta, w_sum, loss_sum = acc
        delta = jax.tree.map(lambda a, c, s: a + w * (c - s), delta, res.params, params)
        return delta, w_sum + w, loss_sum + w * res.mean_loss()

    client_step = jax.jit(client_step, donate_argnums=0)

    @jax.jit
    def start(params, key):
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
    np.save(cfg["params_out"], _flat(jax, params))
    ks = iter(keys[1:])
    times, meter, (_, loss) = C.time_calls(lambda: one_round(next(ks)), cfg["rounds"],
                                           jax.block_until_ready)
    return dict(round_s=C.median(times), round_times=times, cores=meter.cores, others=meter.others,
                compile_s=comp.wall, first_call_s=first.wall, train_loss=float(loss))


def worker_torch(cfg) -> dict:
    import copy

    import torch
    from torch import nn
    from torch.utils.data import DataLoader, TensorDataset

    torch.manual_seed(SEED)
    torch.set_num_threads(cfg["torch_threads"])
    d = np.load(cfg["data"])
    global_model = nn.Sequential(nn.Linear(FEATURES, HIDDEN), nn.ReLU(), nn.Linear(HIDDEN, CLASSES))

    class Client:  # PFLlib clientbase/clientavg, data held in memory
        def __init__(self, x, y):
            self.data = TensorDataset(torch.from_numpy(x), torch.from_numpy(y).long())
            self.n = len(y)
            self.model = copy.deepcopy(global_model)
            self.loss = nn.CrossEntropyLoss()

        def set_parameters(self, model):
            for new, old in zip(model.parameters(), self.model.parameters()):
                old.data = new.data.clone()

        def train(self):
            loader = DataLoader(self.data, batch_size=BATCH, shuffle=True, drop_last=True)
            opt = torch.optim.SGD(self.model.parameters(), lr=LR)
            self.model.train()
            step, losses = 0, []
            while step < LOCAL_STEPS:
                for x, y in loader:
                    opt.zero_grad()
                    loss = self.loss(self.model(x), y)
                    loss.backward()
                    opt.step()
                    losses.append(loss.item())
                    step += 1
                    if step == LOCAL_STEPS:
                        break
            return float(np.mean(losses))

    clients = [Client(d["x"][i], d["y"][i]) for i in range(d["y"].shape[0])]

    def one_round():
        nonlocal global_model
        for c in clients:
            c.set_parameters(global_model)
        losses = [c.train() for c in clients]
        total = sum(c.n for c in clients)
        uploaded = [(c.n / total, c.model) for c in clients]
        global_model = copy.deepcopy(uploaded[0][1])
        for p in global_model.parameters():
            p.data.zero_()
        for w, client_model in uploaded:
            for sp, cp in zip(global_model.parameters(), client_model.parameters()):
                sp.data += cp.data.clone() * w
        return float(np.average(losses, weights=[c.n for c in clients]))

    one_round()  # warm-up
    times, meter, loss = C.time_calls(one_round, cfg["rounds"])
    return dict(round_s=C.median(times), round_times=times, cores=meter.cores, others=meter.others,
                train_loss=loss, torch_threads=torch.get_num_threads())


def worker_main(cfg: dict) -> None:
    fn = {"jax": worker_jax, "loop": worker_loop, "torch": worker_torch}[cfg["kind"]]
    out = fn(cfg)
    out["peak_rss_mb"] = C.peak_rss_mb() * 1.048576  # MiB -> MB (10^6 bytes)
    C.emit(out)


# =========================================================================== driver

def summarize(runs: list[dict], ref_params: dict) -> list[dict]:
    """One row per (config, M): medians over repeats of each run's median."""
    rows = []
    keys = sorted({(r["M"], r["order"]) for r in runs})
    for m, order in keys:
        group = [r for r in runs if r["M"] == m and r["order"] == order and "error" not in r]
        bad = [r["error"] for r in runs if r["M"] == m and r["order"] == order and "error" in r]
        base = next(r for r in runs if r["M"] == m and r["order"] == order)
        row = {k: base[k] for k in ("name", "kind", "strategy", "chunk", "devices", "M", "rounds")}
        row["repeats"] = len(group)
        for k in ("round_s", "scan_s", "compile_s", "compile_scan_s", "first_call_s", "peak_rss_mb",
                  "cores", "scan_cores", "others", "train_loss"):
            row[k] = C.median([g.get(k) for g in group])
        per = [g["round_s"] for g in group]
        row["round_s_min_max"] = [min(per), max(per)] if per else None
        row["max_abs_diff_vs_loop"] = ref_params.get((m, base["name"]))
        row["errors"] = bad or None
        rows.append(row)
    return rows


def headline(rows: list[dict], ms: list[int]) -> list[dict]:
    out = []
    for m in ms:
        at = {r["name"]: r for r in rows if r["M"] == m and r["round_s"] is not None}
        vec = [r for r in at.values() if r["kind"] == "jax"]
        if not vec:
            continue
        best = min(vec, key=lambda r: r["round_s"])
        best_scan = min(vec, key=lambda r: r["scan_s"])
        loop, torch = at.get("loop", {}).get("round_s"), at.get("torch", {}).get("round_s")
        ratio = lambda a, b: a / b if a and b else None
        out.append(dict(M=m, best=best["name"], best_round_s=best["round_s"],
                        best_scan=best_scan["name"], best_scan_s=best_scan["scan_s"],
                        loop_s=loop, torch_s=torch,
                        best_vs_torch=ratio(torch, best["round_s"]),
                        best_vs_loop=ratio(loop, best["round_s"]),
                        best_scan_vs_torch=ratio(torch, best_scan["scan_s"]),
                        best_scan_vs_loop=ratio(loop, best_scan["scan_s"]),
                        best_compile_s=best["compile_s"], best_peak_rss_mb=best["peak_rss_mb"]))
    return out


def check_targets(rows, heads, ms) -> dict:
    top = max(ms)
    h = next((x for x in heads if x["M"] == top), {})
    vec = [r for r in rows if r["kind"] == "jax" and r["compile_s"] is not None]
    best = [r for r in rows if r["name"] == h.get("best")]
    comp = [r["compile_s"] for r in best]
    return {
        "M": top,
        "best_vs_torch>=50": None if h.get("best_vs_torch") is None else h["best_vs_torch"] >= 50,
        "best_vs_loop>=2": None if h.get("best_vs_loop") is None else h["best_vs_loop"] >= 2,
        "compile_max_s_all_vectorized": max((r["compile_s"] for r in vec), default=None),
        "compile<5s": all(r["compile_s"] < TARGETS["compile_max_s"] for r in vec),
        "best_compile_s_by_M": {r["M"]: r["compile_s"] for r in best},
        "compile_flat_in_M(max/min<2)": bool(comp) and max(comp) / max(min(comp), 1e-3) < 2,
        "best_peak_rss_mb": h.get("best_peak_rss_mb"),
        "peak_rss<=800MB": (h.get("best_peak_rss_mb") or 1e9) <= TARGETS["peak_rss_max_mb"],
    }


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--clients", type=int, nargs="+", default=[100, 1000, 10000])
    p.add_argument("--chunks", type=int, nargs="+", default=[16, 32, 50, 64])
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--quick", action="store_true", help="tiny sizes (smoke test, < 60 s)")
    p.add_argument("--only", nargs="*", help="run only configurations whose name contains one of these")
    p.add_argument("--wait-quiet", type=float, default=0.0,
                   help="before each run wait up to this many s for other processes to go idle")
    p.add_argument("--torch-threads", type=int, default=1,
                   help="intra-op threads of the torch loop (1 is faster for this loop)")
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
    if a.quick:  # one configuration per code path keeps the smoke test short
        cfgs = [c for c in cfgs if c["name"] not in ("vmap (1 dev)", "sharded")]
    if a.only:
        cfgs = [c for c in cfgs if any(s in c["name"] for s in a.only) or c["kind"] == "loop"]
    tmp = tempfile.mkdtemp(prefix="round_speed_")
    for m in a.clients:
        make_data(m, os.path.join(tmp, f"data_{m}.npz"))
    runs, ref_params = [], {}
    for rep in range(a.repeats):
        for m in a.clients:
            for order, cfg in enumerate(cfgs):
                spec = dict(cfg, M=m, order=order, rounds=rounds_for(m, cfg["kind"], a.quick),
                            torch_threads=a.torch_threads,
                            data=os.path.join(tmp, f"data_{m}.npz"),
                            params_out=os.path.join(tmp, f"params_{m}_{order}_{rep}.npy"))
                if a.wait_quiet:
                    C.wait_for_quiet(max_wait_s=a.wait_quiet)
                res = C.run_worker([os.path.abspath(__file__), "--worker", json.dumps(spec)])
                runs.append({**{k: spec[k] for k in ("name", "kind", "strategy", "chunk", "devices",
                                                     "M", "order", "rounds")}, **res, "repeat": rep})
                print(f"[rep {rep + 1}/{a.repeats}] M={m:<6} {cfg['name']:<18} " + (
                    f"ERROR {res['error'][-300:]}" if "error" in res else
                    f"round {C.fmt(res['round_s'])} s  scan {C.fmt(res.get('scan_s'))} s  "
                    f"compile {C.fmt(res.get('compile_s'), 3)} s  rss {res['peak_rss_mb']:.0f} MB  "
                    f"cores {res['cores']:.2f}  others {res['others']:.2f}"), flush=True)
    # Correctness: params after the first round (same init and keys) vs the loop's.
    for m in a.clients:
        loop_order = next(i for i, c in enumerate(cfgs) if c["kind"] == "loop")
        ref = os.path.join(tmp, f"params_{m}_{loop_order}_0.npy")
        for order, cfg in enumerate(cfgs):
            path = os.path.join(tmp, f"params_{m}_{order}_0.npy")
            if cfg["kind"] == "jax" and os.path.exists(path) and os.path.exists(ref):
                ref_params[(m, cfg["name"])] = float(np.max(np.abs(np.load(path) - np.load(ref))))
    rows = summarize(runs, ref_params)
    heads = headline(rows, a.clients)
    targets = check_targets(rows, heads, a.clients)
    diffs = list(ref_params.values())
    correct = {"max_abs_param_diff_vs_loop": max(diffs) if diffs else None,
               "pass(<1e-5)": bool(diffs) and max(diffs) < 1e-5}
    print_report(rows, heads, targets, correct)
    result = dict(benchmark="round_speed", hardware=C.hardware(), versions=C.versions(),
                  config=dict(clients=a.clients, chunks=a.chunks, repeats=a.repeats, quick=a.quick,
                              examples_per_client=N_EXAMPLES, model=f"MLP {FEATURES}-{HIDDEN}-{CLASSES}",
                              local_steps=LOCAL_STEPS, batch_size=BATCH, client_lr=LR, seed=SEED,
                              torch_threads=a.torch_threads,
                              data="synthetic(1,1); clients with < 64 rows dropped",
                              command="python benchmarks/round_speed.py " + " ".join(sys.argv[1:])),
                  correctness=correct, headline=heads, targets=dict(TARGETS, **targets), rows=rows,
                  runs=[{k: v for k, v in r.items()} for r in runs])
    os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
    with open(a.out, "w") as f:
        json.dump(result, f, indent=1)
    print(f"wrote {a.out}")
    errors = [r for r in runs if "error" in r]
    if errors or not correct["pass(<1e-5)"]:
        sys.exit(1)


def print_report(rows, heads, targets, correct) -> None:
    print("\n" + C.markdown_table(
        ["M", "config", "round s", "scan s", "min..max", "compile s", "peak MB", "cores", "others",
         "max |dp| vs loop"],
        [[r["M"], r["name"], r["round_s"], r["scan_s"],
          "-" if not r["round_s_min_max"] else "%s..%s" % tuple(C.fmt(x, 3) for x in r["round_s_min_max"]),
          r["compile_s"], r["peak_rss_mb"], r["cores"], r["others"], r["max_abs_diff_vs_loop"]]
         for r in rows]))
    print("\n" + C.markdown_table(
        ["M", "best (jit round)", "s", "best (scan)", "s/round", "loop (b) s", "torch (c) s",
         "best vs (c)", "best vs (b)", "scan vs (c)", "scan vs (b)"],
        [[h["M"], h["best"], h["best_round_s"], h["best_scan"], h["best_scan_s"], h["loop_s"],
          h["torch_s"], h["best_vs_torch"], h["best_vs_loop"], h["best_scan_vs_torch"],
          h["best_scan_vs_loop"]] for h in heads]))
    print("\ntargets (at M=%s): >= 50x vs (c), >= 2x vs (b), compile < 5 s and flat in M, "
          "peak RSS <= 0.8 GB" % targets["M"])
    print(json.dumps(targets, indent=1, default=str))
    print("correctness:", json.dumps(correct))


if __name__ == "__main__":
    main()
