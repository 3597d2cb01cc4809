"""Metrics against hand-computed values, and bootstrap intervals that behave."""

from __future__ import annotations

import numpy as np
import pytest

from covid_xray.metrics import compute_metrics
from covid_xray.report import metrics_table

CLASSES = ["Covid", "Normal", "Viral Pneumonia"]


def _probs(pred, n_classes=3, confidence=0.8):
    p = np.full((len(pred), n_classes), (1 - confidence) / (n_classes - 1))
    p[np.arange(len(pred)), pred] = confidence
    return p


def test_metrics_match_a_hand_computed_confusion_matrix():
    y = np.array([0, 0, 0, 0, 1, 1, 1, 2, 2, 2])
    pred = np.array([0, 0, 0, 1, 1, 1, 2, 2, 2, 0])
    m = compute_metrics(y, _probs(pred), CLASSES, n_boot=200)
    assert m["n"] == 10 and m["accuracy"] == 0.7
    assert m["confusion_matrix"] == [[3, 1, 0], [0, 2, 1], [1, 0, 2]]
    covid = m["per_class"]["Covid"]
    assert covid["sensitivity"] == 0.75  # 3 of 4 Covid found
    assert covid["specificity"] == round(5 / 6, 4)  # 1 false alarm among 6 others
    assert covid["precision"] == 0.75 and covid["f1"] == 0.75
    lo, hi = m["ci95"]["accuracy"]
    assert lo < 0.7 < hi
    # 7 images at 0.8 on the true class, 3 at 0.1: the mean cross-entropy by hand.
    assert m["log_loss"] == pytest.approx((7 * -np.log(0.8) + 3 * -np.log(0.1)) / 10, abs=1e-4)


def test_perfect_predictions_and_intervals_contain_the_estimate():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, 60)
    m = compute_metrics(y, _probs(y), CLASSES, n_boot=300)
    assert m["accuracy"] == 1.0 and m["macro_auc"] == 1.0
    assert m["ci95"]["accuracy"] == [1.0, 1.0]
    noisy = compute_metrics(y, rng.dirichlet([1, 1, 1], 60), CLASSES, n_boot=300)
    for c in CLASSES:
        for metric, (lo, hi) in noisy["ci95"]["per_class"][c].items():
            value = noisy["per_class"][c][metric]
            assert lo <= value <= hi, (c, metric)
    assert "Accuracy" in metrics_table(noisy)


def test_auc_agrees_with_scikit_learn():
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(1)
    y = rng.integers(0, 3, 50)
    probs = rng.dirichlet([1, 1, 1], 50)
    m = compute_metrics(y, probs, CLASSES, n_boot=10)
    assert m["macro_auc"] == pytest.approx(roc_auc_score(y, probs, multi_class="ovr", average="macro"), abs=1e-4)


def test_auc_equals_scikit_learn_with_and_without_ties():
    from sklearn.metrics import roc_auc_score

    from covid_xray.metrics import _auc

    rng = np.random.default_rng(2)
    for n in (2, 5, 40, 200):
        y = rng.integers(0, 2, n).astype(bool)
        y[:2] = [True, False]
        for scores in (rng.random(n), rng.integers(0, 4, n) / 4):  # continuous, then heavily tied
            assert _auc(y, scores) == pytest.approx(roc_auc_score(y, scores), abs=1e-12)
