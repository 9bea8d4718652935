"""Cost of one client's nu-step meta-gradient vs nu, for each mode.

Measures, for nu in {1, 2, 3, 5, 10} and mode in {fo, hf, exact, exact+remat}
(plus the plain gradient, nu = 0), the wall time of one jitted call of
`meta_gradient` on Per-FedAvg's MLP (784-80-60-10, ELU, 68k params) with
batches of 40 for D, D', D'' (independent Hessian batches), and the temporary
memory XLA allocates for it (`compiled.memory_analysis().temp_size_in_bytes`,
the peak scratch of the computation; deterministic). Timings are medians over
interleaved repeats, all configurations measured side by side in one process.

Target (issue 4): exact time linear in nu; exact <= 4x fo at nu = 5.

  .venv/bin/python benchmarks/meta_cost.py            # full grid (~3 min)
  .venv/bin/python benchmarks/meta_cost.py --quick    # smoke run
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

from fedjax_pfl import models  # noqa: E402
from fedjax_pfl.algorithms.meta_fl import meta_gradient  # noqa: E402

MODES = {"fo": ("fo", False), "hf": ("hf", False), "exact": ("exact", False),
         "exact+remat": ("exact", True)}


def build(nu, mode, remat, batch):
    model = models.mlp((784,), 10, hidden=(80, 60), activation="elu")
    params = model.init(jax.random.key(0))
    rng = np.random.default_rng(0)
    make = lambda *shape: {"x": jnp.asarray(rng.random(shape + (784,)), jnp.float32),
                           "y": jnp.asarray(rng.integers(0, 10, shape), jnp.int32)}
    inner, outer, hess = make(nu, batch), make(batch), make(nu, batch)
    loss = lambda p, b: jnp.mean(model.loss(model.apply(p, b, None), b))
    if nu == 0:
        fn = jax.jit(lambda p, o: jax.value_and_grad(loss)(p, o))
        args = (params, outer)
    else:
        fn = jax.jit(lambda p, i, o, h: meta_gradient(loss, p, i, o, h, alpha=0.01, mode=mode,
                                                      remat=remat))
        args = (params, inner, outer, hess)
    compiled = fn.lower(*args).compile()
    mem = compiled.memory_analysis()
    temp = getattr(mem, "temp_size_in_bytes", float("nan")) if mem is not None else float("nan")
    jax.block_until_ready(compiled(*args))
    return compiled, args, temp


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--calls", type=int, default=20)
    parser.add_argument("--batch", type=int, default=40)
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results",
                                                      "meta_cost.json"))
    a = parser.parse_args()
    nus = [1, 2] if a.quick else [1, 2, 3, 5, 10]
    repeats, calls = (2, 3) if a.quick else (a.repeats, a.calls)
    configs = [(0, "grad")] + [(nu, m) for nu in nus for m in MODES]
    built = {}
    for nu, name in configs:
        mode, remat = MODES.get(name, ("fo", False))
        built[(nu, name)] = build(nu, mode, remat, a.batch)
    times = {c: [] for c in configs}
    for _ in range(repeats):  # interleaved, so load changes hit every configuration
        for c in configs:
            fn, args, _ = built[c]
            start = time.perf_counter()
            for _ in range(calls):
                out = fn(*args)
            jax.block_until_ready(out)
            times[c].append((time.perf_counter() - start) / calls)
    med = {c: float(np.median(t)) for c, t in times.items()}
    rows, records = [], []
    for nu, name in configs:
        t, temp = med[(nu, name)], built[(nu, name)][2]
        ratio = t / med[(nu, "fo")] if nu else float("nan")
        records.append({"nu": nu, "mode": name, "median_ms": 1e3 * t,
                        "all_ms": [1e3 * x for x in times[(nu, name)]],
                        "temp_mib": temp / 2**20, "vs_fo": ratio, "vs_grad": t / med[(0, "grad")]})
        rows.append([nu, name, f"{1e3 * t:.3f}", f"{t / med[(0, 'grad')]:.1f}",
                     "" if not nu else f"{ratio:.2f}", f"{temp / 2**20:.2f}"])
    fits = {}
    for name in MODES:
        x = np.array(nus, float)
        y = np.array([med[(nu, name)] for nu in nus])
        slope, icpt = np.polyfit(x, y, 1)
        r2 = 1 - np.sum((y - (slope * x + icpt)) ** 2) / np.sum((y - y.mean()) ** 2)
        fits[name] = {"ms_per_nu": 1e3 * slope, "intercept_ms": 1e3 * icpt, "r2": float(r2)}
    table = markdown_table(["nu", "mode", "median ms", "x grad", "x fo (same nu)", "temp MiB"],
                           rows)
    print(table)
    for name, f in fits.items():
        print(f"{name}: {f['ms_per_nu']:.3f} ms per nu step, intercept {f['intercept_ms']:.3f} ms,"
              f" linear fit R^2 = {f['r2']:.4f}")
    if 5 in nus:
        print(f"exact / fo at nu=5: {med[(5, 'exact')] / med[(5, 'fo')]:.2f} (target <= 4)")
    write_json(a.out, {"benchmark": "meta_cost", "batch": a.batch, "repeats": repeats,
                       "calls": calls, "model": "mlp 784-80-60-10 elu", "records": records,
                       "linear_fits": fits, "hardware": hardware(), "versions": versions(),
                       "load_avg_1m_at_end": os.getloadavg()[0]})


if __name__ == "__main__":
    main()
