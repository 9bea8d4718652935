"""FedAvg CNN round on CPU: vectorized strategies vs a per-client loop, for both convolutions.

Workload: the FedAvg CNN (`models.cnn`: two 5x5 convs 32/64, 2x2 max-pool, 512
hidden) on 28x28x1 and 32x32x3 images, M = 50 clients of 64 random examples,
FedAvg with full participation, 5 local SGD steps of batch 32, lr 0.05.

Round variants, each in a FRESH process with 2 host devices (`use_cpu_devices(2)`):
  "loop": a Python loop over clients, one jitted `local_train` + weighted
      accumulation per client (as round_speed's loop), params on device 0.
  "vmap", "chunked C", "sharded+chunk C": `jax.jit(algo.round)` under that
      `Execution`.
Each for `conv="patches"` (im2col + matmul, `models.layers`, the default) and
`conv="xla"` (`lax.conv_general_dilated`, what `flax.linen.Conv` runs).
Median s/round after a warm-up round. After one round from the same init and
keys every vectorized run's params must match its loop's.

Step variants ("--steps"): one client's SGD step on a batch of 32, in one process:
5 steps unrolled vs inside `lax.scan`, and a vmap over 10 clients (per client-step).

  python benchmarks/cnn_speed.py                       # ~20 min on 2 cores
  python benchmarks/cnn_speed.py --quick --out /tmp/c.json
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import tempfile

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common as C  # noqa: E402

SHAPES = {"28x28x1": (28, 28, 1), "32x32x3": (32, 32, 3)}
N, STEPS, BATCH, LR, CLASSES = 64, 5, 32, 0.05, 10
OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "cnn_speed_cpu.json")


def _setup(spec):
    import fedjax_pfl as fp

    fp.use_cpu_devices(2)
    import jax

    shape, m = SHAPES[spec["shape"]], spec["clients"]
    rng = np.random.default_rng(0)
    train = fp.ClientData(examples={"x": rng.random((m, N, *shape), np.float32),
                                    "y": rng.integers(0, CLASSES, (m, N)).astype(np.int32)},
                          num_examples=np.full(m, N, np.int32))
    return fp, jax, train, fp.models.cnn(shape, CLASSES, conv=spec["conv"])


def round_worker(spec) -> dict:
    fp, jax, train, model = _setup(spec)
    import jax.numpy as jnp
    import optax

    from fedjax_pfl.core import local, sampling

    key, rounds = jax.random.key(1), spec["rounds"]
    client_key = sampling.round_keys(key)[1]  # the round's client-key base, as fedavg's round
    if spec["strategy"] == "loop":
        train = jax.device_put(train)
        loss_fn = local.model_loss_fn(model)
        xs = [train.examples["x"][i] for i in range(train.num_clients)]
        ys = [train.examples["y"][i] for i in range(train.num_clients)]

        @functools.partial(jax.jit, donate_argnums=0)
        def client(acc, params, cid, x, y):
            data = fp.ClientData(examples={"x": x, "y": y}, num_examples=jnp.int32(N))
            res = local.local_train(params, data, jax.random.fold_in(client_key, cid),
                                    loss_fn=loss_fn, optimizer=optax.sgd(LR), batch_size=BATCH,
                                    local_steps=STEPS)
            return jax.tree.map(lambda a, c, s: a + (c - s) / len(xs), acc, res.params, params)

        params = model.init(jax.random.key(0))

        def one_round(params):
            acc = jax.tree.map(jnp.zeros_like, params)
            for i in range(len(xs)):
                acc = client(acc, params, np.int32(i), xs[i], ys[i])
            return jax.block_until_ready(jax.tree.map(jnp.add, params, acc))
    else:
        ex = fp.Execution(spec["strategy"], chunk_size=spec.get("chunk"))
        train = fp.shard_clients(train) if spec["strategy"] == "sharded" else jax.device_put(train)
        algo = fp.algorithms.fedavg(model, client_lr=LR, batch_size=BATCH, local_steps=STEPS,
                                    execution=ex)
        state, round_fn = algo.init(jax.random.key(0), train), jax.jit(algo.round)

        def one_round(state):
            return jax.block_until_ready(round_fn(state, train, key)[0])
        params = state
    with C.Meter() as first:
        out = one_round(params)
    flat = np.concatenate([np.ravel(x) for x in jax.tree.leaves(
        out if spec["strategy"] == "loop" else out.params)])
    np.save(spec["params_path"], flat)
    times = []
    for _ in range(rounds):
        with C.Meter() as m:
            one_round(params)
        times.append(m.wall)
    return {"round_s": C.median(times), "first_s": first.wall, "cores": m.cores,
            "others": m.others, "peak_rss_mb": C.peak_rss_mb()}


def step_worker(spec) -> dict:
    fp, jax, train, model = _setup(spec)
    import jax.numpy as jnp

    x = jnp.asarray(train.examples["x"][0, :BATCH])
    y = jnp.asarray(train.examples["y"][0, :BATCH])
    params = model.init(jax.random.key(0))
    loss = lambda p: jnp.mean(model.loss(model.apply(p, {"x": x}, None), {"y": y}))

    def sgd(p, _=None):
        return jax.tree.map(lambda a, g: a - LR * g, p, jax.grad(loss)(p)), None

    def unrolled(p):
        for _ in range(STEPS):
            p, _ = sgd(p)
        return p
    fns = {"unrolled": (jax.jit(unrolled), params, STEPS),
           "scan": (jax.jit(lambda p: jax.lax.scan(sgd, p, None, length=STEPS)[0]), params, STEPS),
           "vmap 10": (jax.jit(jax.vmap(unrolled)),
                       jax.tree.map(lambda a: jnp.stack([a] * 10), params), 10 * STEPS)}
    out = {}
    for name, (fn, p, per) in fns.items():
        jax.block_until_ready(fn(p))
        times, _, _ = C.time_calls(functools.partial(fn, p), 5, jax.block_until_ready)
        out[f"{name}_ms"] = 1e3 * C.median(times) / per
    return out


def specs(args, tmp) -> list[dict]:
    out = []
    for shape in args.shapes:
        for conv in ("patches", "xla"):
            base = dict(kind="round", shape=shape, conv=conv, clients=args.clients,
                        rounds=args.rounds if conv == "patches" else 1)
            strategies = [("loop", None), ("vmap", None), ("chunked", 5), ("sharded", 1),
                          ("sharded", 5)]
            if conv == "xla":  # minutes per round: the loop and the two ends only
                strategies = [("loop", None), ("vmap", None), ("sharded", 1)]
            for strategy, chunk in strategies:
                name = "sharded+chunk" if strategy == "sharded" else strategy
                label = f"{shape} {conv} {strategy if chunk is None else f'{name} {chunk}'}"
                out.append({**base, "strategy": strategy, "chunk": chunk, "label": label,
                            "params_path": os.path.join(tmp, label.replace(" ", "_") + ".npy")})
            if args.steps:
                out.append(dict(kind="step", shape=shape, conv=conv, clients=1,
                                label=f"{shape} {conv} step"))
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    p.add_argument("--clients", type=int, default=50)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--quick", action="store_true", help="tiny sizes (smoke test)")
    p.add_argument("--out", default=OUT)
    args = p.parse_args()
    if args.worker:
        spec = json.loads(args.worker)
        C.emit(round_worker(spec) if spec["kind"] == "round" else step_worker(spec))
        return
    if args.quick:
        args.shapes, args.clients, args.rounds, args.steps = ["28x28x1"], 4, 1, False
    with tempfile.TemporaryDirectory() as tmp:
        runs = C.run_matrix(__file__, specs(args, tmp), repeats=1, timeout_s=3600,
                            describe=lambda r: ", ".join(f"{k} {v:.3f}" for k, v in r.items()
                                                         if k.endswith(("_s", "_ms"))))
        for r in runs:  # one round from the same init: vectorized params == loop params
            if r["kind"] == "round" and "error" not in r:
                loop = r["params_path"].rsplit(r["conv"], 1)[0] + r["conv"] + "_loop.npy"
                r["max_abs_diff_vs_loop"] = float(np.max(np.abs(
                    np.load(r["params_path"]) - np.load(loop))))
    print(f"\n{'config':34s} {'s/round':>9s} {'vs loop':>8s} {'max|diff|':>10s}")
    for r in runs:
        if r["kind"] != "round" or "error" in r:
            continue
        loop = next(q for q in runs if q.get("strategy") == "loop" and q["shape"] == r["shape"]
                    and q["conv"] == r["conv"])
        r["speedup_vs_loop"] = loop["round_s"] / r["round_s"]
        print(f"{r['label']:34s} {r['round_s']:9.3f} {r['speedup_vs_loop']:7.2f}x "
              f"{r['max_abs_diff_vs_loop']:10.1e}")
    for r in runs:
        if r["kind"] == "step" and "error" not in r:
            print(f"{r['label']:34s} ms per client-step: unrolled {r['unrolled_ms']:.1f}, "
                  f"scan {r['scan_ms']:.1f}, vmap 10 {r['vmap 10_ms']:.1f}")
    C.write_json(args.out, {"hardware": C.hardware(), "versions": C.versions(), "runs": runs,
                            "command": " ".join(sys.argv)})


if __name__ == "__main__":
    main()
