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
        table = {"num_examples": n.astype(np.int64),
                 "accuracy": np.where(n > 0, m["num_correct"] / n, np.nan),
                 "loss": np.where(n > 0, m["loss_sum"] / n, np.nan)}
    for k, v in m.items():
        if k not in ("num_examples", "num_correct", "loss_sum") and v.shape == n.shape:
            table[k] = v
    if CLASS_KEYS <= set(m):
        table["f1"] = np.where(n > 0, f1_weighted(m), np.nan)
        table["auc"] = np.where(n > 0, auc_macro(m, absent="zero"), np.nan)
        table["auc_skip"] = np.where(n > 0, auc_macro(m, absent="skip"), np.nan)
    return table


CLASS_KEYS = {"class_tp", "class_pred", "class_true", "class_auc"}
ABSENT = ("zero", "skip")


def f1_weighted(metrics: Mapping[str, object]) -> np.ndarray:
    """Per-client class-weighted F1 [M] from the per-class counts [M, C].

    Equals scikit-learn's `f1_score(y, pred, average="weighted")`: the F1 of
    each class (2 tp / (pred + true), 0 when undefined) weighted by its support.
    Clients with no test example get 0.
    """
    tp, pred, true = (np.asarray(metrics[k], np.float64)
                      for k in ("class_tp", "class_pred", "class_true"))
    denom = pred + true
    f1 = np.divide(2 * tp, denom, out=np.zeros_like(tp), where=denom > 0)
    support = true.sum(-1)
    return np.divide((f1 * true).sum(-1), support, out=np.zeros_like(support), where=support > 0)


def auc_macro(metrics: Mapping[str, object], absent: str = "zero") -> np.ndarray:
    """Per-client macro one-vs-rest AUC [M] from the per-class AUCs [M, C].

    Args:
      metrics: per-client statistics with `class_auc` and `class_true` [M, C].
      absent: how classes without both a positive and a negative test example
        count: "zero" (AUC 0, still in the mean, like torchmetrics and the
        FedAPM code) or "skip" (left out, like scikit-learn on the classes
        present; NaN for a client with no such class).
    """
    if absent not in ABSENT:
        raise ValueError(f"absent: expected one of {ABSENT}, got {absent!r}.")
    auc = np.asarray(metrics["class_auc"], np.float64)
    true = np.asarray(metrics["class_true"], np.float64)
    if absent == "zero":
        return auc.mean(-1)
    total = true.sum(-1, keepdims=True)
    defined = (true > 0) & (true < total)
    count = defined.sum(-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(count > 0, np.where(defined, auc, 0.0).sum(-1) / count, np.nan)


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
      `num_clients` (with a test example); keys prefixed by `prefix`. For
      sequence models (statistics with `num_tokens`, see
      `core.local.evaluate_client`) accuracies are per-token: each client's
      is its token accuracy (`acc_weighted` weights them by test examples),
      and `acc_token_weighted` is correct tokens over all tokens.
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
    if "num_tokens" in m:  # sequence models: correct tokens over all counted tokens
        tokens = float(m["num_tokens"].sum())
        out["acc_token_weighted"] = (float(m["num_correct_tokens"].sum() / tokens) if tokens > 0
                                     else float("nan"))
    if "f1" in table:
        out["f1_mean"] = float(np.mean(table["f1"][has]))
        out["auc_mean"] = float(np.mean(table["auc"][has]))
        skip = table["auc_skip"][has]
        out["auc_skip_mean"] = float(np.nanmean(skip)) if np.isfinite(skip).any() else float("nan")
    return {prefix + k: v for k, v in out.items()}


def finetune_curve(metrics: Mapping[str, object]) -> dict[str, np.ndarray]:
    """Accuracy and loss vs fine-tuning steps nu' from `curve_*` statistics.

    Args:
      metrics: per-client statistics with `num_examples` [M] and
        `curve_num_correct`, `curve_loss_sum` [M, nu_max + 1] (entry j: after j
        fine-tuning steps; see `fedjax_pfl.core.finetune`).

    Returns:
      dict of [nu_max + 1] arrays: `steps` (0..nu_max), `acc_weighted`,
      `acc_mean` (unweighted over clients with a test example), `loss_weighted`.
    """
    if "curve_num_correct" not in metrics:
        raise ValueError("metrics: no 'curve_num_correct'; evaluate an algorithm that reports "
                         "the fine-tuning curve (meta_fl, per_fedavg, fedavg_ft(ft_curve_steps=)).")
    n = np.asarray(metrics["num_examples"], np.float64)
    correct = np.asarray(metrics["curve_num_correct"], np.float64)
    loss = np.asarray(metrics["curve_loss_sum"], np.float64)
    has = n > 0
    if not has.any():
        raise ValueError("metrics: no client has a test example; nothing to summarize.")
    total = n.sum()
    return {
        "steps": np.arange(correct.shape[1]),
        "acc_weighted": correct.sum(0) / total,
        "acc_mean": np.mean(correct[has] / n[has, None], axis=0),
        "loss_weighted": loss.sum(0) / total,
    }
