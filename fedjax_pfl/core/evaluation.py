"""Test statistics of ONE client: the sums every evaluation reports and the
per-class sufficient statistics of class-weighted F1 and macro one-vs-rest AUC
(`metrics.f1_weighted`, `metrics.auc_macro` form them on the host).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from fedjax_pfl.data.client_data import ClientData, client_examples
from fedjax_pfl.models.model import Model


def evaluate_client(model: Model, params, data: ClientData) -> dict[str, jax.Array]:
    """Test statistics of `params` on ONE client's rows (padding masked out).

    Besides the sums, per-class sufficient statistics [C] are returned so that
    the host can form class-weighted F1 and macro one-vs-rest AUC
    (`metrics.f1_weighted`, `metrics.auc_macro`): true positives, predicted
    and true counts, and each class's one-vs-rest AUC of the softmax
    probabilities (Mann-Whitney rank formula, ties counted 1/2; 0 where the
    class has no positive or no negative test example).

    Sequence models (logits [N, T, C], labels [N, T]) are scored per token:
    the tokens of the real rows that `model.token_mask` keeps (padding does
    not count) are the units of accuracy and of the per-class statistics. So
    that every consumer of `num_correct / num_examples` (metrics, fine-tuning
    curves, best-of-K) reads the client's token accuracy, `num_correct` is
    `num_examples * correct_tokens / num_tokens`; the exact token counts come
    as the extra scalars `num_tokens` and `num_correct_tokens` (from which
    `metrics.summarize` forms the token-weighted `acc_token_weighted`).
    `loss_sum` sums the model's per-example losses (each a mean over tokens).

    Returns:
      dict with scalars `num_examples`, `num_correct`, `loss_sum` and [C]
      arrays `class_tp`, `class_pred`, `class_true`, `class_auc`; sequence
      models add scalars `num_tokens`, `num_correct_tokens`.
    """
    examples = client_examples(data)
    logits = model.apply(params, examples, None)
    num_rows, num_classes = logits.shape[0], logits.shape[-1]
    rows = jnp.arange(num_rows) < data.num_examples
    labels = examples["y"]
    loss = jnp.where(rows, model.loss(logits, examples), 0.0)
    num_examples = data.num_examples.astype(jnp.float32)
    extra = {}
    per_token = logits.ndim == 3
    if per_token:  # per-token predictions: count the kept tokens of the real rows
        token_mask = getattr(model, "token_mask", None)
        keep = rows[:, None] if token_mask is None else rows[:, None] & token_mask(examples)
        keep = jnp.broadcast_to(keep, labels.shape)
        logits, labels, mask = logits.reshape(-1, num_classes), labels.reshape(-1), keep.reshape(-1)
    else:
        mask = rows
    pred = jnp.argmax(logits, -1)
    num_correct = jnp.sum((pred == labels) & mask).astype(jnp.float32)
    if per_token:
        num_tokens = jnp.sum(mask).astype(jnp.float32)
        extra = {"num_tokens": num_tokens, "num_correct_tokens": num_correct}
        num_correct = num_examples * num_correct / jnp.maximum(num_tokens, 1.0)
    classes = jnp.arange(num_classes)[None, :]
    is_true = (labels[:, None] == classes) & mask[:, None]  # [N, C]
    is_pred = (pred[:, None] == classes) & mask[:, None]
    probs = jax.nn.softmax(logits.astype(jnp.float32), -1)
    return {
        "num_examples": num_examples,
        "num_correct": num_correct,
        "loss_sum": jnp.sum(loss),
        "class_tp": jnp.sum(is_true & is_pred, 0).astype(jnp.float32),
        "class_pred": jnp.sum(is_pred, 0).astype(jnp.float32),
        "class_true": jnp.sum(is_true, 0).astype(jnp.float32),
        "class_auc": jax.vmap(_ovr_auc, in_axes=(1, 1, None))(probs, is_true, mask),
        **extra,
    }


_PAIRWISE_AUC_MAX_ROWS = 128


def _ovr_auc(scores, positive, mask):
    """One-vs-rest AUC of one class: scores [N], positive [N] bool, mask [N] bool.

    Small N (the usual per-client test set) compares all pairs, which is a few
    vector ops; large N ranks the scores with a sort.
    """
    if scores.shape[0] > _PAIRWISE_AUC_MAX_ROWS:
        return _ovr_auc_ranks(scores, positive, mask)
    return _ovr_auc_pairs(scores, positive, mask)


def _ovr_auc_pairs(scores, positive, mask):
    """`_ovr_auc` by counting (positive, negative) pairs in order (ties 1/2)."""
    negative = mask & ~positive
    wins = (scores[:, None] > scores[None, :]) + 0.5 * (scores[:, None] == scores[None, :])
    u_stat = jnp.sum(jnp.where(positive[:, None] & negative[None, :], wins, 0.0))
    num_pos = jnp.sum(positive).astype(jnp.float32)
    num_neg = jnp.sum(negative).astype(jnp.float32)
    ok = (num_pos > 0) & (num_neg > 0)
    return jnp.where(ok, u_stat / jnp.where(ok, num_pos * num_neg, 1.0), 0.0)


def _ovr_auc_ranks(scores, positive, mask):
    """`_ovr_auc` by the Mann-Whitney rank formula (ties get mid-ranks)."""
    scores = jnp.where(mask, scores, 2.0)  # padding sorts above every probability
    ordered = jnp.sort(scores)
    low = jnp.searchsorted(ordered, scores, side="left")
    high = jnp.searchsorted(ordered, scores, side="right")
    rank = (low + high + 1).astype(jnp.float32) / 2  # 1-based mid-rank among valid rows
    num_pos = jnp.sum(positive).astype(jnp.float32)
    num_neg = jnp.sum(mask).astype(jnp.float32) - num_pos
    u_stat = jnp.sum(jnp.where(positive, rank, 0.0)) - num_pos * (num_pos + 1) / 2
    ok = (num_pos > 0) & (num_neg > 0)
    return jnp.where(ok, u_stat / jnp.where(ok, num_pos * num_neg, 1.0), 0.0)
