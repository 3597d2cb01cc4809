"""Calibration and referral: the softmax, temperature scaling fitted on validation (with its prior),
reliability bins and the expected calibration error, and the referral rule (the confidence threshold
below which a radiologist must look, applying it, and how it did).
"""

from __future__ import annotations

from typing import Any

import numpy as np

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


# Why a film is referred, as predictions say it.
REASONS = {
    "ood": "does not look like the training X-rays",
    "atypical": "unlike the training films of the class it is called",
    "low_confidence": "confidence below the referral threshold",
}


def refer(probs: np.ndarray, ood_flags: np.ndarray | None, threshold: float,
          atypical: np.ndarray | None = None) -> np.ndarray:
    """The referral rule: refer an image to a radiologist when it is out of distribution, unlike the
    training films of its predicted class, or its calibrated confidence is below `threshold`.
    probs N×C; ood_flags and atypical N bools (None: the bundle has no such check)."""
    referred = np.asarray(probs).max(1) < threshold
    for flags in (ood_flags, atypical):
        if flags is not None:
            referred = referred | np.asarray(flags, bool)
    return referred


def refer_reasons(confidence: float, threshold: float, ood: bool | None, atypical: bool | None) -> list[str]:
    """One film's reasons for referral (empty: not referred), in REASONS' order."""
    found = {"ood": bool(ood), "atypical": bool(atypical), "low_confidence": confidence < threshold}
    return [REASONS[name] for name, hit in found.items() if hit]


def referral_summary(probs: np.ndarray, labels, referred: np.ndarray, positive: int | None) -> dict[str, Any]:
    """How the referral rule did: share referred, accuracy on the rest, and the `positive` class's
    sensitivity when a referred image counts as caught (a radiologist looks at it)."""
    y, referred = np.asarray(labels, int), np.asarray(referred, bool)
    correct = probs.argmax(1) == y
    summary = {"n": int(len(y)), "referred_rate": round(float(referred.mean()), 4) if len(y) else None,
               "accuracy_not_referred": round(float(correct[~referred].mean()), 4) if (~referred).any() else None,
               # Wrong and not referred: the answers a triage team would act on, wrongly.
               "confidently_wrong_rate": round(float((~correct & ~referred).mean()), 4) if len(y) else None}
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
