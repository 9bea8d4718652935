"""Refactor identity check: every registered algorithm's state, round metrics and
evaluation after a few rounds, saved once and compared after a change.

Each algorithm runs with its defaults and with the options that reach its other
code paths (`CASES`), on M = 11 clients of 0..20 examples (two empty), a
cohort of 5, 3 jitted rounds from seed 0, then `evaluate`. Every array leaf
(state, per-round metrics, evaluation) is keyed by its path.

    python benchmarks/identity.py --save benchmarks/results/identity_reference.npz  # before
    python benchmarks/identity.py --check benchmarks/results/identity_reference.npz # after

`--check` prints the largest difference per case, |got - reference| / max(1,
|reference|) (absolute for values up to 1, relative above, so a reference saved
on another CPU or XLA build still matches), and fails (exit 1) above `--tol`
(1e-6) or when a leaf is found on one side only.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # noqa: E402

# (algorithm, options) pairs; the name of a case is "algorithm" or "algorithm[key=value,...]".
CASES = [
    ("fedavg", {}), ("fedavg", {"server_optimizer": "adam", "server_lr": 0.01}),
    ("fedavg", {"weighting": "uniform", "local_steps": 3}),
    ("fedprox", {}), ("local", {}), ("fedavg_ft", {"ft_steps": 2}), ("scaffold", {}),
    ("fedfew", {}), ("fedfew", {"num_models": 2, "mu": 0.1}), ("ifca", {}),
    ("hypcluster", {}), ("fedem", {}),
    ("cfl", {"max_clusters": 2, "warmup_rounds": 0, "eps1": 1e3, "eps2": 0.0}),
    ("ditto", {}), ("ditto", {"personal_steps": 2}), ("apfl", {}),
    ("meta_fl", {"nu": 2, "inner_lr": 0.05}), ("meta_fl", {"nu": 2, "mode": "fo"}),
    ("per_fedavg", {}), ("per_fedavg", {"eval_lr": 0.02}),
    ("pfedme", {"inner_steps": 2, "lam": 2.0}), ("pfedme", {"train_all_clients": True}),
    ("fedapm", {}), ("fedalt", {}), ("fedsim", {}), ("fedrep", {}), ("fedper", {}),
    ("lg_fedavg", {}), ("fedbabu", {"ft_steps": 2}), ("fedrod", {}),
]
BASE = {"batch_size": 4, "local_steps": 2, "client_lr": 0.1, "clients_per_round": 5}
ROUNDS = 3


def case_name(algo: str, options: dict) -> str:
    if not options:
        return algo
    return f"{algo}[{','.join(f'{k}={v}' for k, v in sorted(options.items()))}]"


def run_case(algo: str, options: dict) -> dict[str, np.ndarray]:
    import jax

    import fedjax_pfl as fp
    from fedjax_pfl import testing

    model = fp.models.mlp((6,), 3, hidden=(8,))
    train = testing.random_client_data(0, 11, empty=(3, 8))
    test = testing.random_client_data(0, 11, sample_seed=1, empty=(8,))
    alg = fp.ALGORITHMS[algo](model, **{**BASE, **options})
    state = alg.init(jax.random.key(0), train)
    round_fn = jax.jit(alg.round)
    out = {}
    for r in range(ROUNDS):
        state, metrics = round_fn(state, train, jax.random.fold_in(jax.random.key(1), r))
        out.update(_flatten(f"round{r}", metrics))
    out.update(_flatten("state", state))
    out.update(_flatten("evaluate", jax.jit(alg.evaluate)(state, train, test)))
    return out


def _flatten(prefix: str, tree) -> dict[str, np.ndarray]:
    import jax

    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {f"{prefix}{jax.tree_util.keystr(p)}": np.asarray(v) for p, v in leaves
            if not jax.dtypes.issubdtype(getattr(v, "dtype", None), jax.dtypes.prng_key)}


def compare(reference: dict[str, np.ndarray], got: dict[str, np.ndarray]) -> tuple[float, list]:
    """(largest |got - ref| / max(1, |ref|) over the reference's leaves, the leaves found
    on one side only)."""
    worst, missing = 0.0, [f"{key} (new)" for key in sorted(set(got) - set(reference))]
    for key, want in reference.items():
        if key not in got:
            missing.append(key)
            continue
        have = got[key]
        if have.shape != want.shape:
            missing.append(f"{key} (shape {have.shape} != {want.shape})")
            continue
        want = want.astype(np.float64)
        diff = np.abs(have.astype(np.float64) - want) / np.maximum(1.0, np.abs(want))
        worst = max(worst, float(np.max(diff, initial=0.0)))
    return worst, missing


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    group = parser.add_mutually_exclusive_group(required=True)
    group.add_argument("--save", help="write the reference npz here")
    group.add_argument("--check", help="compare against this reference npz")
    parser.add_argument("--only", nargs="*", help="algorithms to run (default: every case)")
    parser.add_argument("--quick", action="store_true", help="only fedavg and fedfew cases")
    parser.add_argument("--tol", type=float, default=1e-6)
    parser.add_argument("--out", help="JSON summary (default: none)")
    args = parser.parse_args(argv)
    only = {"fedavg", "fedfew"} if args.quick else set(args.only or [])
    cases = [(a, o) for a, o in CASES if not only or a in only]
    if args.save:
        arrays = {}
        for algo, options in cases:
            arrays.update({f"{case_name(algo, options)}/{k}": v
                           for k, v in run_case(algo, options).items()})
        np.savez_compressed(args.save, **arrays)
        print(f"saved {len(arrays)} arrays of {len(cases)} cases to {args.save}")
        rows = [{"case": case_name(a, o)} for a, o in cases]
    else:
        with np.load(args.check) as f:
            reference = dict(f)
        rows = []
        for algo, options in cases:
            name = case_name(algo, options)
            want = {k[len(name) + 1:]: v for k, v in reference.items()
                    if k.startswith(name + "/")}
            worst, missing = compare(want, run_case(algo, options))
            ok = bool(want) and not missing and worst <= args.tol
            rows.append({"case": name, "leaves": len(want), "max_diff": worst,
                         "missing": missing, "ok": ok})
            print(f"{'ok  ' if ok else 'FAIL'} {name:45s} {len(want):4d} leaves  "
                  f"max diff {worst:.3g}" + (f"  missing {missing[:3]}" if missing else ""))
    result = {"mode": "save" if args.save else "check", "rows": rows,
              "hardware": _common.hardware(), "versions": _common.versions()}
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1))
    return 0 if all(r.get("ok", True) for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
