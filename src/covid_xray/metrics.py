"""Metrics a clinician can read, each with a 95% bootstrap confidence interval: accuracy, per-class
sensitivity/specificity/precision/F1/AUC, macro AUC, the confusion matrix and the log loss, on one set of
images or per data source; and the stable `name=value` lines that log scrapers read.
"""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np

PER_CLASS = ("sensitivity", "specificity", "precision", "f1", "auc")


def _aucs(positives: np.ndarray, scores: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """ROC AUC of each resample at once: `counts` (R×N) says how often each image is in each resample.
    The Mann–Whitney statistic on average ranks (ties count one half), the same number as sklearn's
    roc_auc_score on the resampled images; NaN where a resample lacks positives or negatives. Ranks come
    from one sort of the scores and cumulative counts, so 1000 resamples cost about what one did."""
    order = np.argsort(scores, kind="stable")
    sorted_scores, positives = scores[order], positives[order]
    new_value = np.r_[True, sorted_scores[1:] != sorted_scores[:-1]]
    starts, group = np.flatnonzero(new_value), np.cumsum(new_value) - 1  # each tie group's first image; each image's group
    result = np.empty(len(counts))
    rows = max(1, 2_000_000 // max(len(scores), 1))  # resamples per block: bounded memory on large splits
    for first in range(0, len(counts), rows):
        block = counts[first : first + rows][:, order].astype(float)
        in_group = np.add.reduceat(block, starts, axis=1)
        mean_rank = np.cumsum(in_group, axis=1) - in_group + (in_group + 1) / 2  # 1-based, ties averaged
        n_pos, n_neg = block[:, positives].sum(1), block[:, ~positives].sum(1)
        rank_sum = (block * mean_rank[:, group])[:, positives].sum(1)
        with np.errstate(divide="ignore", invalid="ignore"):
            result[first : first + rows] = np.where(
                (n_pos > 0) & (n_neg > 0), (rank_sum - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg), np.nan)
    return result


def _point_metrics(y: np.ndarray, probs: np.ndarray, n_classes: int, auc: np.ndarray) -> dict[str, Any]:
    """Every metric but the AUCs (`auc`, per class, computed for all resamples at once by `_aucs`)."""
    pred = probs.argmax(axis=1)
    cm = np.bincount(y * n_classes + pred, minlength=n_classes * n_classes).reshape(n_classes, n_classes)
    tp = np.diag(cm).astype(float)
    fn, fp = cm.sum(1) - tp, cm.sum(0) - tp
    tn = cm.sum() - tp - fn - fp
    with np.errstate(divide="ignore", invalid="ignore"):
        sens, spec, prec = tp / (tp + fn), tn / (tn + fp), tp / (tp + fp)
        f1 = 2 * tp / (2 * tp + fp + fn)
    return {
        "accuracy": float(tp.sum() / max(len(y), 1)),
        "sensitivity": sens, "specificity": spec, "precision": prec, "f1": f1, "auc": auc,
        "macro_auc": float(np.nanmean(auc)) if not np.isnan(auc).all() else float("nan"),
        "confusion_matrix": cm,
    }


def _num(x: float) -> float | None:
    return None if np.isnan(x) else round(float(x), 4)


def compute_metrics(
    y_true, probs, classes: list[str], *, n_boot: int = 1000, seed: int = 0
) -> dict[str, Any]:
    """Accuracy, per-class sensitivity/specificity/precision/F1/AUC, macro AUC and the confusion matrix,
    with percentile 95% CIs from `n_boot` resamples of the images; and the log loss (cross-entropy), which
    still separates two models when both get every image of a small split right."""
    from sklearn.metrics import log_loss

    y, probs, k = np.asarray(y_true, dtype=int), np.asarray(probs, dtype=float), len(classes)
    resamples = np.random.default_rng(seed).integers(0, len(y), (n_boot, len(y)))
    # Row 0: the images as they are; then how often each image is drawn in each resample.
    counts = np.vstack([np.ones(len(y), int), *(np.bincount(idx, minlength=len(y)) for idx in resamples)])
    aucs = np.stack([_aucs(y == c, probs[:, c], counts) for c in range(k)], axis=1)
    point = _point_metrics(y, probs, k, aucs[0])
    boots = [_point_metrics(y[idx], probs[idx], k, auc) for idx, auc in zip(resamples, aucs[1:])]

    def ci(values) -> list[float | None]:
        values = np.asarray(values, dtype=float)
        if np.isnan(values).all():
            return [None, None]
        lo, hi = np.nanpercentile(values, [2.5, 97.5], axis=0)
        return [_num(lo), _num(hi)]

    def rates(cm):
        with np.errstate(divide="ignore", invalid="ignore"):
            return cm / cm.sum(axis=1, keepdims=True)

    with warnings.catch_warnings():  # the rows of classes absent from these images are all NaN
        warnings.simplefilter("ignore", RuntimeWarning)
        rate_lo, rate_hi = (np.nanpercentile([rates(b["confusion_matrix"]) for b in boots], q, axis=0) for q in (2.5, 97.5))
    return {
        "accuracy": round(point["accuracy"], 4),
        "n": int(len(y)),
        "per_class": {
            c: {m: _num(point[m][i]) for m in PER_CLASS} for i, c in enumerate(classes)
        },
        "macro_auc": _num(point["macro_auc"]),
        "log_loss": round(float(log_loss(y, probs / probs.sum(axis=1, keepdims=True), labels=range(k))), 4),
        "confusion_matrix": point["confusion_matrix"].tolist(),
        "ci95": {
            "accuracy": ci([b["accuracy"] for b in boots]),
            "macro_auc": ci([b["macro_auc"] for b in boots]),
            "per_class": {
                c: {m: ci([b[m][i] for b in boots]) for m in PER_CLASS} for i, c in enumerate(classes)
            },
            "confusion_matrix_rates": [
                [[_num(lo), _num(hi)] for lo, hi in zip(row_lo, row_hi)] for row_lo, row_hi in zip(rate_lo, rate_hi)
            ],
        },
        "bootstrap_resamples": n_boot,
    }


def per_source_metrics(
    y_true, probs, sources: list[str], classes: list[str], *, n_boot: int = 1000, seed: int = 0
) -> dict[str, dict[str, Any]]:
    """`compute_metrics` on each source's images (sources in order of first appearance). A source
    missing a class gets None for that class's sensitivity and AUC, not an error."""
    y, probs, sources_arr = np.asarray(y_true, dtype=int), np.asarray(probs, dtype=float), np.asarray(sources)
    return {
        name: compute_metrics(y[sources_arr == name], probs[sources_arr == name], classes, n_boot=n_boot, seed=seed)
        for name in dict.fromkeys(sources)
    }


def summary_lines(metrics: dict[str, Any], prefix: str) -> list[str]:
    """Stable `name=value` lines (one metric per line) that log scrapers such as SageMaker can parse."""
    lines = [f"{prefix}_accuracy={metrics['accuracy']:.4f}", f"{prefix}_macro_auc={metrics['macro_auc']}"]
    for c, m in metrics["per_class"].items():
        key = c.lower().replace(" ", "_")
        lines += [f"{prefix}_{key}_sensitivity={m['sensitivity']}", f"{prefix}_{key}_specificity={m['specificity']}"]
    return lines
