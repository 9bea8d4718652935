"""Federated data at real scale: memory and round time with long-tailed client sizes.

Populations (generated client by client, nothing downloaded):

* ``synthetic``: LEAF Synthetic(1,1)-shaped, sizes int(lognormal(4, 2)) + 50 as
  in the LEAF/FedProx generator (heavy tail: the largest of 10^5 clients holds
  ~10^5 rows), 60 float32 features, 10 classes; MLP 60-64-10.
* ``femnist``: 3,550 writers with FEMNIST's size distribution (LEAF: mean 227,
  std 89 images), 28x28x1 float32 images, 62 classes; LEAF's FEMNIST CNN.
* ``shakespeare``: 1,129 speakers with Shakespeare's long tail (LEAF: mean
  3,743, std 6,212 windows; fitted lognormal), 80-character windows, the
  char-LSTM of LEAF.

Each configuration runs in a fresh process and reports: raw bytes of the data,
bytes the store holds (flat layout) and what the dense [M, N_max] padding
would need, bytes per stored example, peak RSS (VmHWM) against the target
1.5 x raw + 1 GB, and FedAvg round time (median, after compile) per client.
Clients are built lazily (one at a time) so that building the store needs the
data once plus a 64 MB staging buffer.

  python benchmarks/data_scale.py                       # the full table (~30 min on 2 cores)
  python benchmarks/data_scale.py --only synthetic --clients 1000 10000
  python benchmarks/data_scale.py --quick --out /tmp/ds.json   # smoke test
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Sequence

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common as C  # noqa: E402

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


class LazyClients(Sequence):
    """Client i generated on demand from seed (seed, i): the population is never held twice."""

    def __init__(self, sizes, make):
        self.sizes, self.make = np.asarray(sizes), make

    def __len__(self):
        return len(self.sizes)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        return self.make(int(i), int(self.sizes[i]))


def population(name: str, clients: int, seed: int = 0):
    """(LazyClients, input description) of a named population."""
    rng = np.random.default_rng(seed)
    if name == "synthetic":
        sizes = rng.lognormal(4, 2, clients).astype(np.int64) + 50
        std = np.arange(1, 61) ** -0.6

        def make(i, n):
            r = np.random.default_rng([seed, i])
            w, b, v = r.normal(r.normal(), 1, (10, 60)), r.normal(0, 1, 10), r.normal(0, 1, 60)
            x = (v + std * r.standard_normal((n, 60))).astype(np.float32)
            return {"x": x, "y": np.argmax(x @ w.T + b, axis=1).astype(np.int32)}
        return LazyClients(sizes, make), ((60,), 10)
    if name == "femnist":
        sizes = np.clip(rng.normal(227, 89, clients), 10, None).astype(np.int64)

        def make(i, n):
            r = np.random.default_rng([seed, i])
            return {"x": r.random((n, 28, 28, 1), np.float32),
                    "y": r.integers(0, 62, n).astype(np.int32)}
        return LazyClients(sizes, make), ((28, 28, 1), 62)
    if name == "shakespeare":
        sigma2 = np.log1p((6212 / 3743) ** 2)
        sizes = np.maximum(rng.lognormal(np.log(3743) - sigma2 / 2, np.sqrt(sigma2), clients),
                           2).astype(np.int64)

        def make(i, n):
            r = np.random.default_rng([seed, i])
            return {"x": r.integers(0, 80, (n, 80)).astype(np.int32),
                    "y": r.integers(0, 80, n).astype(np.int32)}
        return LazyClients(sizes, make), ((80,), 80)
    raise ValueError(f"population: unknown {name!r}")


def worker(spec: dict) -> dict:
    import jax

    import fedjax_pfl as fp
    from fedjax_pfl.models import benchmarks as zoo

    clients, (shape, classes) = population(spec["population"], spec["clients"])
    sizes = clients.sizes
    row_bytes = (int(np.prod(shape)) + 1) * 4
    t0 = time.perf_counter()
    train = fp.ClientData.from_clients(clients, layout=spec["layout"])
    jax.block_until_ready(train)
    build_s = time.perf_counter() - t0
    rss_data = C.peak_rss_mb()
    model = {"synthetic": lambda: fp.models.mlp(shape, classes, hidden=(64,)),
             "femnist": lambda: zoo.femnist_cnn(shape, classes),
             "shakespeare": lambda: zoo.char_lstm(shape, classes)}[spec["population"]]()
    schedule = ({"local_epochs": spec["epochs"]} if spec.get("epochs")
                else {"local_steps": spec["steps"]})
    algo = fp.algorithms.fedavg(model, client_lr=0.05, batch_size=spec["batch"],
                                clients_per_round=spec.get("cohort"),
                                execution=fp.Execution("chunked", chunk_size=spec["chunk"]),
                                **schedule)
    state = algo.init(jax.random.key(0), train)
    round_fn = jax.jit(algo.round, donate_argnums=0)
    t0 = time.perf_counter()
    state, _ = jax.block_until_ready(round_fn(state, train, jax.random.key(1)))
    first_s = time.perf_counter() - t0
    times = []
    for r in range(spec["rounds"]):
        t0 = time.perf_counter()
        state, metrics = jax.block_until_ready(round_fn(state, train, jax.random.key(2 + r)))
        times.append(time.perf_counter() - t0)
    out = {"peak_rss_rounds_gb": C.peak_rss_mb() / 1e3}  # before any evaluation
    if spec.get("evaluate"):
        evaluate = jax.jit(algo.evaluate)
        t0 = time.perf_counter()
        jax.block_until_ready(evaluate(state, train, train))
        out["eval_first_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        stats = jax.block_until_ready(evaluate(state, train, train))
        out["eval_s"] = time.perf_counter() - t0
        out["eval_examples"] = int(np.asarray(stats["num_examples"]).sum())
    raw = int(sizes.sum()) * row_bytes
    cohort = spec.get("cohort") or spec["clients"]
    round_s = C.median(times)
    peak = C.peak_rss_mb()
    return {**out, "examples": int(sizes.sum()), "largest_client": int(sizes.max()),
            "raw_gb": raw / 1e9, "stored_gb": train.stored_rows * row_bytes / 1e9,
            "dense_gb": len(sizes) * int(sizes.max()) * row_bytes / 1e9,
            "bytes_per_example": train.stored_rows * row_bytes / int(sizes.sum()),
            "is_flat": train.is_flat, "build_s": build_s, "rss_after_data_gb": rss_data / 1e3,
            "first_round_s": first_s, "round_s": round_s, "us_per_client": 1e6 * round_s / cohort,
            "peak_rss_gb": peak / 1e3, "rss_target_gb": 1.5 * raw / 1e9 + 1.0,
            "rss_ok": peak / 1e3 <= 1.5 * raw / 1e9 + 1.0,
            "train_loss": float(metrics["train_loss"])}


def specs(args) -> list[dict]:
    out = []
    if "synthetic" in args.only:
        for m in args.clients:
            base = dict(population="synthetic", clients=m, layout="flat", batch=10, chunk=256,
                        rounds=args.rounds, evaluate=m <= args.eval_max_clients)
            out.append({**base, "steps": 5, "label": f"synthetic M={m} steps"})
            if m <= args.epoch_max_clients:
                out.append({**base, "epochs": 1, "evaluate": False,
                            "label": f"synthetic M={m} 1 epoch"})
    if "femnist" in args.only:
        out.append(dict(population="femnist", clients=3550, layout="flat", batch=10, chunk=10,
                        steps=5, cohort=50, rounds=args.rounds, label="femnist cohort 50"))
    if "shakespeare" in args.only:
        out.append(dict(population="shakespeare", clients=1129, layout="flat", batch=10,
                        chunk=10, steps=5, cohort=10, rounds=args.rounds,
                        label="shakespeare cohort 10"))
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--only", nargs="+", default=["synthetic", "femnist", "shakespeare"])
    p.add_argument("--clients", nargs="+", type=int, default=[1000, 10000, 100000])
    p.add_argument("--epoch-max-clients", type=int, default=10000)
    p.add_argument("--eval-max-clients", type=int, default=10000,
                   help="evaluate (train as test) only up to this M (evaluation is O(M) too)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--quick", action="store_true", help="tiny populations (smoke test)")
    p.add_argument("--out", default=os.path.join(RESULTS, "data_scale.json"))
    args = p.parse_args()
    if args.worker:
        C.emit(worker(json.loads(args.worker)))
        return
    if args.quick:
        args.clients, args.rounds, args.epoch_max_clients = [50], 1, 50
        args.only = ["synthetic"]
    runs = C.run_matrix(__file__, specs(args), repeats=1, timeout_s=3600,
                        describe=lambda r: (f"round {r['round_s']:.3f} s  "
                                            f"{r['us_per_client']:.0f} us/client  "
                                            f"peak {r['peak_rss_gb']:.2f} GB "
                                            f"(target {r['rss_target_gb']:.2f})"))
    print(f"\n{'config':28s} {'raw GB':>7s} {'dense GB':>9s} {'stored':>7s} {'B/ex':>6s} "
          f"{'peak GB':>8s} {'ok':>3s} {'s/round':>8s} {'us/client':>9s} {'eval s':>7s}")
    for r in runs:
        if "error" in r:
            print(f"{r['label']:28s} ERROR {r['error'][-200:]}")
            continue
        ev = f"{r['eval_s']:.2f}" if "eval_s" in r else "-"
        print(f"{r['label']:28s} {r['raw_gb']:7.2f} {r['dense_gb']:9.1f} {r['stored_gb']:7.2f} "
              f"{r['bytes_per_example']:6.0f} {r['peak_rss_gb']:8.2f} "
              f"{'yes' if r['rss_ok'] else 'NO':>3s} {r['round_s']:8.3f} "
              f"{r['us_per_client']:9.1f} {ev:>7s}")
    C.write_json(args.out, {"hardware": C.hardware(), "versions": C.versions(), "runs": runs,
                            "command": " ".join(sys.argv)})


if __name__ == "__main__":
    main()
