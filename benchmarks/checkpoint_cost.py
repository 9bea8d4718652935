"""Checkpoint size and save/restore time of a whole algorithm state (orbax).

The round_speed workload (M clients of 64 random examples, MLP 60-64-10): the
state of FedAvg (one global model) and of FedAPM (per-client v_i, u_i, pi_i
stacked [M, ...]) is saved with `fedjax_pfl.checkpoint.Checkpoints`, as
`simulate` does, and restored; median of `--repeats` saves and restores.

  python benchmarks/checkpoint_cost.py --clients 10000 --repeats 3
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common  # noqa: E402


def _size(path: str) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(path)
               for f in files)


def measure(name: str, clients: int, repeats: int) -> dict:
    import jax

    import fedjax_pfl as fp

    rng = np.random.default_rng(0)
    clients_data = [{"x": rng.normal(size=(64, 60)).astype(np.float32),
                     "y": rng.integers(0, 10, 64).astype(np.int32)} for _ in range(clients)]
    train = fp.ClientData.from_clients(clients_data, num_classes=10)
    model = fp.models.mlp((60,), 10, hidden=(64,))
    algo = fp.ALGORITHMS[name](model, local_steps=5)
    state = algo.init(jax.random.key(0), train)
    # One round, so per-client rows differ (an initial state is constant and compresses away).
    state = jax.block_until_ready(jax.jit(algo.round)(state, train, jax.random.key(1))[0])
    from fedjax_pfl.checkpoint import Checkpoints

    saves, restores = [], []
    with tempfile.TemporaryDirectory() as root:
        ckpt = Checkpoints(root, keep=repeats + 1)
        for step in range(repeats):
            t0 = time.perf_counter()
            ckpt.save(step, state, {"seed": 0})
            saves.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            jax.block_until_ready(ckpt.restore(state, step)[0])
            restores.append(time.perf_counter() - t0)
        size = _size(os.path.join(root, "0"))
        ckpt.close()
    state_bytes = sum(a.nbytes for a in jax.tree.leaves(state))
    return {"algorithm": name, "clients": clients, "state_bytes": int(state_bytes),
            "checkpoint_bytes": int(size), "save_s": _common.median(saves),
            "restore_s": _common.median(restores), "save_s_all": saves,
            "restore_s_all": restores}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=10000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="M=200, 1 repeat (smoke test)")
    parser.add_argument("--out", default="benchmarks/results/checkpoint_cost.json")
    args = parser.parse_args()
    clients, repeats = (200, 1) if args.quick else (args.clients, args.repeats)
    rows = [measure(name, clients, repeats) for name in ("fedavg", "fedapm")]
    print(_common.markdown_table(
        ["algorithm", "M", "state MB", "checkpoint MB", "save s (median)", "restore s (median)"],
        [[r["algorithm"], r["clients"], _common.fmt(r["state_bytes"] / 1e6),
          _common.fmt(r["checkpoint_bytes"] / 1e6), _common.fmt(r["save_s"]),
          _common.fmt(r["restore_s"])] for r in rows]))
    _common.write_json(args.out, {"hardware": _common.hardware(), "versions": _common.versions(
        ("jax", "jaxlib", "flax", "orbax-checkpoint", "numpy")), "rows": rows})


if __name__ == "__main__":
    main()
