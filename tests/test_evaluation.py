"""Metrics against hand-computed values, and bootstrap intervals that behave."""

from __future__ import annotations

import numpy as np
import pytest
from _images import xray_like

from covid_xray.images import load_image
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


def test_auc_of_every_resample_equals_scikit_learn_with_and_without_ties():
    from sklearn.metrics import roc_auc_score

    from covid_xray.metrics import _aucs

    rng = np.random.default_rng(2)
    for n in (2, 5, 40, 200):
        y = rng.integers(0, 2, n).astype(bool)
        y[:2] = [True, False]
        for scores in (rng.random(n), rng.integers(0, 4, n) / 4):  # continuous, then heavily tied
            resamples = rng.integers(0, n, (30, n))
            counts = np.vstack([np.ones(n, int), *(np.bincount(r, minlength=n) for r in resamples)])
            aucs = _aucs(y, scores, counts)
            assert aucs[0] == pytest.approx(roc_auc_score(y, scores), abs=1e-12)
            for auc, r in zip(aucs[1:], resamples):
                if y[r].all() or not y[r].any():
                    assert np.isnan(auc)  # undefined: one class only
                else:
                    assert auc == pytest.approx(roc_auc_score(y[r], scores[r]), abs=1e-12)


def test_size_swap_probe_catches_a_model_that_reads_the_native_size(tmp_path):
    from covid_xray.confounds import size_confounds
    from covid_xray.data import Sample
    from covid_xray.duplicates import inspect_file
    from covid_xray.evaluation import size_swap_probe
    from covid_xray.report import size_swap_lines

    classes = ["A", "B", "C"]
    samples = []
    for label, stored in enumerate((32, 32, 96)):  # C stored larger: downsampled to 64 it keeps sharp grain
        for i in range(6):
            path = tmp_path / f"{classes[label]}{i}.png"
            xray_like(96, seed=100 * label + i).convert("L").resize((stored, stored)).save(path)
            samples.append(Sample(path, label, "site"))
    confound, = size_confounds([inspect_file(s.path, "test", classes[s.label], "site") for s in samples])
    assert (confound.label, confound.size, confound.other_size) == ("C", "96×96", "32×32")

    def detail(images: np.ndarray) -> np.ndarray:
        return np.abs(np.diff(images.astype(float), axis=-1)).mean(axis=(1, 2))

    cut = np.median(detail(np.stack([load_image(s.path, 64) for s in samples])))

    def reads_texture(images: np.ndarray) -> np.ndarray:  # "C" when the film is sharp, whatever it shows
        sharp = detail(images) > cut
        return np.stack([~sharp * 0.5, ~sharp * 0.5, sharp * 1.0], axis=1)

    cheat = size_swap_probe(reads_texture, samples, classes, confound, 64)
    assert cheat["class_called_class"] == 1.0 and cheat["class_called_class_restored"] == 0.0
    assert "carries the class" in size_swap_lines([cheat])[0]

    def blind(images: np.ndarray) -> np.ndarray:  # looks at nothing the size changes
        return np.tile([0.2, 0.2, 0.6], (len(images), 1))

    honest = size_swap_probe(blind, samples, classes, confound, 64)
    assert honest["class_called_class"] == honest["class_called_class_restored"] == 1.0
    assert "changes little" in size_swap_lines([honest])[0]
