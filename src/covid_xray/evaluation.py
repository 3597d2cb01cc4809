"""Metrics a clinician can read, each with a 95% bootstrap confidence interval; plots; the report."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import numpy as np

PER_CLASS = ("sensitivity", "specificity", "precision", "f1", "auc")


def _auc(positives: np.ndarray, scores: np.ndarray) -> float:
    """ROC AUC as the Mann–Whitney statistic on average ranks (ties count one half): the same number as
    sklearn's roc_auc_score, without its per-call input validation, which dominated the 1000-resample
    bootstrap (tens of seconds per split on two cores)."""
    from scipy.stats import rankdata

    n_pos = int(positives.sum())
    n_neg = len(positives) - n_pos
    rank_sum = float(rankdata(scores)[positives].sum())
    return (rank_sum - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)


def _point_metrics(y: np.ndarray, probs: np.ndarray, n_classes: int) -> dict[str, Any]:
    pred = probs.argmax(axis=1)
    cm = np.bincount(y * n_classes + pred, minlength=n_classes * n_classes).reshape(n_classes, n_classes)
    tp = np.diag(cm).astype(float)
    fn, fp = cm.sum(1) - tp, cm.sum(0) - tp
    tn = cm.sum() - tp - fn - fp
    with np.errstate(divide="ignore", invalid="ignore"):
        sens, spec, prec = tp / (tp + fn), tn / (tn + fp), tp / (tp + fp)
        f1 = 2 * tp / (2 * tp + fp + fn)
    auc = np.full(n_classes, np.nan)
    for c in range(n_classes):
        positives = y == c
        if 0 < positives.sum() < len(y):  # AUC is undefined when a class is absent or alone
            auc[c] = _auc(positives, probs[:, c])
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
    point = _point_metrics(y, probs, k)
    rng = np.random.default_rng(seed)
    boots = [_point_metrics(y[idx], probs[idx], k) for idx in rng.integers(0, len(y), (n_boot, len(y)))]

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


# --- calibration and referral ------------------------------------------------------------------

TEMPERATURE_RANGE = (0.25, 8.0)
# A validation split of a few dozen images that the model classifies perfectly would drive the
# temperature towards 0 (ever sharper), which then fails on the test split. A normal prior on
# log T, sd 0.5, keeps T near 1 unless the validation images give real evidence.
TEMPERATURE_PRIOR_SD = 0.5


def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    z = np.asarray(logits, np.float64) / temperature
    z = np.exp(z - z.max(axis=1, keepdims=True))
    return (z / z.sum(axis=1, keepdims=True)).astype(np.float32)


def fit_temperature(logits: np.ndarray, labels, prior_sd: float = TEMPERATURE_PRIOR_SD) -> float:
    """The temperature T minimising the negative log-likelihood of softmax(logits / T) (Guo et al. 2017),
    regularised by a normal prior on log T (maximum a posteriori)."""
    from scipy.optimize import minimize_scalar

    y = np.asarray(labels, int)
    if not len(y):
        return 1.0

    def nll(log_t: float) -> float:
        p = softmax(logits, float(np.exp(log_t)))[np.arange(len(y)), y]
        return float(-np.log(np.clip(p, 1e-12, 1)).sum() + 0.5 * (log_t / prior_sd) ** 2)

    lo, hi = np.log(TEMPERATURE_RANGE)
    return float(np.exp(minimize_scalar(nll, bounds=(lo, hi), method="bounded").x))


def reliability_bins(probs: np.ndarray, labels, bins: int = 10) -> list[tuple[float, float, float]]:
    """Per non-empty equal-width confidence bin: (mean confidence, accuracy, share of the images)."""
    probs, y = np.asarray(probs), np.asarray(labels, int)
    confidence, correct = probs.max(1), probs.argmax(1) == y
    which = np.minimum((confidence * bins).astype(int), bins - 1)
    return [(float(confidence[which == b].mean()), float(correct[which == b].mean()), float((which == b).mean()))
            for b in range(bins) if (which == b).any()]


def expected_calibration_error(probs: np.ndarray, labels, bins: int = 10) -> float:
    """Mean |accuracy − confidence| over equal-width confidence bins, weighted by bin size."""
    if not len(labels):
        return float("nan")
    return float(sum(abs(accuracy - confidence) * share for confidence, accuracy, share in reliability_bins(probs, labels, bins)))


def referral_threshold(probs: np.ndarray, labels, positive: int | None, target: float) -> float:
    """The confidence below which a prediction is referred to a radiologist.

    At least `target` itself: a calibrated probability below it means the model expects to be wrong
    more often than the target allows. Raised further when, on these (validation) images, that
    would still leave the `positive` class (Covid) detected-or-referred below `target` sensitivity."""
    probs, y = np.asarray(probs), np.asarray(labels, int)
    confidence, predicted = probs.max(1), probs.argmax(1)
    positives = y == positive if positive is not None else np.zeros(len(y), bool)
    for threshold in sorted({target, *confidence[confidence > target]}):
        caught = (predicted[positives] == positive) | (confidence[positives] < threshold)
        if not positives.any() or caught.mean() >= target:
            return float(threshold)
    return float(np.nextafter(confidence.max(), 2.0))  # refer everything: no threshold reaches the target


def refer(probs: np.ndarray, ood_flags: np.ndarray | None, threshold: float) -> np.ndarray:
    """The referral rule: refer an image to a radiologist when it is out of distribution or its
    calibrated confidence is below `threshold`. probs N×C; ood_flags N bools (None: no guard)."""
    probs = np.asarray(probs)
    low = probs.max(1) < threshold
    return low if ood_flags is None else low | np.asarray(ood_flags, bool)


def referral_summary(probs: np.ndarray, labels, referred: np.ndarray, positive: int | None) -> dict[str, Any]:
    """How the referral rule did: share referred, accuracy on the rest, and the `positive` class's
    sensitivity when a referred image counts as caught (a radiologist looks at it)."""
    y, referred = np.asarray(labels, int), np.asarray(referred, bool)
    correct = probs.argmax(1) == y
    summary = {"n": int(len(y)), "referred_rate": round(float(referred.mean()), 4) if len(y) else None,
               "accuracy_not_referred": round(float(correct[~referred].mean()), 4) if (~referred).any() else None}
    if positive is not None and (y == positive).any():
        caught = (probs.argmax(1) == positive) | referred
        summary["covid_sensitivity_with_referral"] = round(float(caught[y == positive].mean()), 4)
    return summary


def calibration_summary(logits: dict[str, np.ndarray], labels: dict[str, Any], temperature: float) -> dict[str, Any]:
    """ECE before and after temperature scaling on each split (validation fitted it; test is honest)."""
    return {
        "temperature": temperature,
        "fitted_on": "val",
        "ece": {
            split: {"before": round(expected_calibration_error(softmax(lg), labels[split]), 4),
                    "after": round(expected_calibration_error(softmax(lg, temperature), labels[split]), 4)}
            for split, lg in logits.items()
        },
    }


# --- plots ------------------------------------------------------------------------------------


def _figure():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_confusion(metrics: dict[str, Any], classes: list[str], path: Path, title: str) -> None:
    plt = _figure()
    cm = np.asarray(metrics["confusion_matrix"])
    fig, ax = plt.subplots(figsize=(4.8, 4.2))
    ax.imshow(cm, cmap="Blues")
    for i in range(len(classes)):
        for j in range(len(classes)):
            ax.text(j, i, str(cm[i, j]), ha="center", va="center", color="white" if cm[i, j] > cm.max() / 2 else "black")
    ax.set(xticks=range(len(classes)), yticks=range(len(classes)), xlabel="predicted", ylabel="true", title=title)
    ax.set_xticklabels(classes, rotation=20)
    ax.set_yticklabels(classes)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_roc(y_true, probs, classes: list[str], metrics: dict[str, Any], path: Path, title: str) -> None:
    from sklearn.metrics import roc_curve

    plt = _figure()
    y, probs = np.asarray(y_true), np.asarray(probs)
    fig, ax = plt.subplots(figsize=(4.8, 4.2))
    for i, c in enumerate(classes):
        if 0 < (y == i).sum() < len(y):
            fpr, tpr, _ = roc_curve(y == i, probs[:, i])
            ax.plot(fpr, tpr, label=f"{c} (AUC {metrics['per_class'][c]['auc']:.3f})")
    ax.plot([0, 1], [0, 1], "k:", lw=0.8)
    ax.set(xlabel="1 − specificity", ylabel="sensitivity", title=title)
    if ax.get_legend_handles_labels()[0]:  # no curve at all when the images are of one class
        ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_learning_curves(history: list[dict[str, float]], best_epoch: int, path: Path) -> None:
    plt = _figure()
    epochs = [h["epoch"] for h in history]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(8, 3.4))
    ax1.plot(epochs, [h["train_loss"] for h in history], label="train")
    ax1.plot(epochs, [h["val_loss"] for h in history], label="validation")
    ax1.set(xlabel="epoch", ylabel="loss")
    ax2.plot(epochs, [h["val_accuracy"] for h in history], color="C1")
    ax2.set(xlabel="epoch", ylabel="validation accuracy", ylim=(0, 1.02))
    for ax in (ax1, ax2):
        ax.axvline(best_epoch, color="grey", ls="--", lw=0.8, label="selected")
    ax1.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_reliability(logits: np.ndarray, labels, temperature: float, path: Path, title: str, bins: int = 10) -> None:
    """Accuracy against confidence per bin, before and after temperature scaling."""
    plt = _figure()
    y = np.asarray(labels, int)
    fig, ax = plt.subplots(figsize=(4.8, 4.2))
    ax.plot([0, 1], [0, 1], "k:", lw=0.8, label="perfectly calibrated")
    edges = np.linspace(0, 1, bins + 1)
    for t, name in ((1.0, "before"), (temperature, f"after (T = {temperature:.2f})")):
        probs = softmax(logits, t)
        confidence, accuracy, _ = zip(*reliability_bins(probs, y, bins))
        ax.plot(confidence, accuracy, "o-", label=f"{name}, ECE {expected_calibration_error(probs, y, bins):.3f}")
    ax.set(xlabel="confidence", ylabel="accuracy", title=title, xlim=(edges[0], edges[-1]), ylim=(0, 1.02))
    ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_plots(run_dir: Path, split: str, y_true, probs, classes: list[str], metrics: dict[str, Any]) -> list[str]:
    names = [f"confusion_{split}.png", f"roc_{split}.png"]
    plot_confusion(metrics, classes, run_dir / names[0], f"Confusion matrix ({split})")
    plot_roc(y_true, probs, classes, metrics, run_dir / names[1], f"ROC one-vs-rest ({split})")
    return names


# --- the Markdown report ---------------------------------------------------------------------


def _fmt(value, interval) -> str:
    if value is None:
        return "n/a"
    lo, hi = interval
    return f"{value:.3f} ({lo:.3f}–{hi:.3f})" if lo is not None else f"{value:.3f}"


def metrics_table(metrics: dict[str, Any]) -> str:
    ci = metrics["ci95"]
    rows = [
        f"Accuracy **{_fmt(metrics['accuracy'], ci['accuracy'])}**, macro AUC {_fmt(metrics['macro_auc'], ci['macro_auc'])}, "
        f"n = {metrics['n']} images. Brackets: 95% bootstrap confidence intervals ({metrics['bootstrap_resamples']} resamples).",
        "",
        "| class | sensitivity | specificity | precision | F1 | AUC |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for c, m in metrics["per_class"].items():
        cells = [_fmt(m[k], ci["per_class"][c][k]) for k in PER_CLASS]
        rows.append(f"| {c} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def per_source_table(per_source: dict[str, dict[str, Any]], holdout: str | None = None) -> str:
    """One row per source: n, accuracy with its CI, each class's sensitivity, macro AUC."""
    classes = list(next(iter(per_source.values()))["per_class"])
    rows = ["| source | n | accuracy | " + " | ".join(f"sensitivity {c}" for c in classes) + " | macro AUC |",
            "| --- |" + " --- |" * (len(classes) + 3)]
    for name, m in per_source.items():
        sensitivity = [_fmt(m["per_class"][c]["sensitivity"], (None, None)) for c in classes]
        label = f"{name} (held out)" if name == holdout else name
        rows.append(f"| {label} | {m['n']} | {_fmt(m['accuracy'], m['ci95']['accuracy'])} | " + " | ".join(sensitivity)
                    + f" | {_fmt(m['macro_auc'], (None, None))} |")
    return "\n".join(rows)


def confusion_table(metrics: dict[str, Any], classes: list[str]) -> str:
    rows = ["| true \\ predicted | " + " | ".join(classes) + " |", "| --- |" + " --- |" * len(classes)]
    for c, row in zip(classes, metrics["confusion_matrix"]):
        rows.append(f"| {c} | " + " | ".join(str(v) for v in row) + " |")
    return "\n".join(rows)
