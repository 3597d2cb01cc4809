"""Every figure of a run's report, drawn with matplotlib (headless, Agg): confusion matrices, one-vs-rest
ROC curves, learning curves and the reliability diagram (calibration before and after).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from .calibration import expected_calibration_error, reliability_bins, softmax


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
