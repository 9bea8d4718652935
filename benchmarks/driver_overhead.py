"""Cost of the driver's divergence guard: `guarded_rounds` vs plain `run_rounds`.

`simulate` runs blocks through `guarded_rounds`, which checks each round's
loss and state for finiteness and keeps the last healthy state (a select over
the state). Side by side in one process, same compiled strategy (chunked, 50),
the round_speed workload (M clients x 64 examples, MLP 60-64-10, 5 local
steps); median seconds per round over `--repeats` blocks of 2 rounds.

  python benchmarks/driver_overhead.py --clients 10000 --repeats 3
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common  # noqa: E402

CASES = (("fedavg", None), ("fedapm", None), ("fedapm", 0.1))


def measure(name: str, fraction, train, repeats: int) -> dict:
    import jax
    import jax.numpy as jnp

    import fedjax_pfl as fp
    from fedjax_pfl.simulate import guarded_rounds, run_rounds, seed_keys

    cohort = None if fraction is None else max(1, int(fraction * train.num_clients))
    algo = fp.ALGORITHMS[name](fp.models.mlp((60,), 10, hidden=(64,)), local_steps=5,
                               clients_per_round=cohort,
                               execution=fp.Execution("chunked", chunk_size=50))
    key, ratio = seed_keys(0)[1], jnp.float32(1e6)
    plain = jax.jit(functools.partial(run_rounds, algo.round), static_argnums=3,
                    donate_argnums=0)
    guarded = jax.jit(functools.partial(guarded_rounds, algo.round),
                      static_argnames="num_rounds", donate_argnums=0)
    state = algo.init(jax.random.key(0), train)
    carry = (algo.init(jax.random.key(0), train), jnp.float32(np.inf), jnp.int32(-1))
    times = {"plain": [], "guarded": []}
    for r in range(repeats + 1):  # the first block compiles
        t0 = time.perf_counter()
        state = jax.block_until_ready(plain(state, train, key, 2)[0])
        t1 = time.perf_counter()
        carry = jax.block_until_ready(guarded(carry, train, key, ratio, num_rounds=2)[0])
        t2 = time.perf_counter()
        if r:
            times["plain"].append((t1 - t0) / 2)
            times["guarded"].append((t2 - t1) / 2)
    plain_s, guarded_s = _common.median(times["plain"]), _common.median(times["guarded"])
    return {"algorithm": name, "clients": train.num_clients, "clients_per_round": cohort,
            "plain_s": plain_s, "guarded_s": guarded_s, "ratio": guarded_s / plain_s,
            "times": times}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=10000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="M=200, 1 repeat (smoke test)")
    parser.add_argument("--out", default="benchmarks/results/driver_overhead.json")
    args = parser.parse_args()
    clients, repeats = (200, 1) if args.quick else (args.clients, args.repeats)
    import fedjax_pfl as fp

    rng = np.random.default_rng(0)
    train = fp.ClientData.from_clients(
        [{"x": rng.normal(size=(64, 60)).astype(np.float32),
          "y": rng.integers(0, 10, 64).astype(np.int32)} for _ in range(clients)],
        num_classes=10)
    rows = [measure(name, fraction, train, repeats) for name, fraction in CASES]
    print(_common.markdown_table(
        ["algorithm", "M", "cohort", "run_rounds s", "guarded s", "guarded / plain"],
        [[r["algorithm"], r["clients"], r["clients_per_round"] or r["clients"], r["plain_s"],
          r["guarded_s"], r["ratio"]] for r in rows]))
    _common.write_json(args.out, {"hardware": _common.hardware(), "versions": _common.versions(
        ("jax", "jaxlib", "flax", "numpy")), "rows": rows})


if __name__ == "__main__":
    main()
