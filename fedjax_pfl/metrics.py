"""Per-client statistics [M] and host-side summaries.

`evaluate` returns sums per client (`num_examples`, `num_correct`,
`loss_sum`); `client_table` turns them into per-client accuracy/loss and
`summarize` into the numbers PFL papers report: the sample-weighted mean
accuracy (PFLlib's "averaged test acc"), the unweighted mean over clients,
std, min, 10/50/90th percentiles and Jain's fairness index. Clients with no
test examples are excluded from per-client statistics.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np


def client_table(metrics: Mapping[str, object]) -> dict[str, np.ndarray]:
    """Per-client accuracy and mean loss ([M] NumPy arrays, NaN for empty clients)."""
    m = {k: np.asarray(v, np.float64) for k, v in metrics.items()}
    n = m["num_examples"]
    with np.errstate(invalid="ignore", divide="ignore"):
        table = {"num_examples": n.astype(np.int64), "accuracy": np.where(n > 0, m["num_correct"] / n, np.nan),
                 "loss": np.where(n > 0, m["loss_sum"] / n, np.nan)}
    for k, v in m.items():
        if k not in ("num_examples", "num_correct", "loss_sum") and v.shape == n.shape:
            table[k] = v
    return table


def jain_index(values: np.ndarray) -> float:
    """Jain's fairness index (sum x)^2 / (n sum x^2), in [1/n, 1]; 1 = all equal."""
    values = np.asarray(values, np.float64)
    denom = len(values) * np.sum(values**2)
    return float(np.sum(values) ** 2 / denom) if denom > 0 else float("nan")


def summarize(metrics: Mapping[str, object], prefix: str = "") -> dict[str, float]:
    """Host-side summary of per-client test statistics.

    Returns:
      dict with `acc_weighted`, `acc_mean`, `acc_std`, `acc_min`, `acc_p10`,
      `acc_p50`, `acc_p90`, `acc_jain`, `loss_weighted`, `loss_mean`,
      `num_clients` (with a test example); keys prefixed by `prefix`.
    """
    m = {k: np.asarray(v, np.float64) for k, v in metrics.items()}
    table = client_table(m)
    has = table["num_examples"] > 0
    if not has.any():
        raise ValueError("metrics: no client has a test example; nothing to summarize.")
    acc, loss = table["accuracy"][has], table["loss"][has]
    total = max(float(m["num_examples"].sum()), 1.0)
    out = {
        "acc_weighted": float(m["num_correct"].sum() / total),
        "acc_mean": float(np.mean(acc)),
        "acc_std": float(np.std(acc)),
        "acc_min": float(np.min(acc)),
        "acc_p10": float(np.percentile(acc, 10)),
        "acc_p50": float(np.percentile(acc, 50)),
        "acc_p90": float(np.percentile(acc, 90)),
        "acc_jain": jain_index(acc),
        "loss_weighted": float(m["loss_sum"].sum() / total),
        "loss_mean": float(np.mean(loss)),
        "num_clients": int(has.sum()),
    }
    return {prefix + k: v for k, v in out.items()}
