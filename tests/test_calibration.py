"""Temperature scaling, expected calibration error and the referral threshold, on synthetic scores."""

from __future__ import annotations

import numpy as np
import pytest

from covid_xray.calibration import (
    expected_calibration_error,
    fit_temperature,
    refer,
    referral_summary,
    referral_threshold,
    softmax,
)


def overconfident(n: int, seed: int, sharpness: float = 6.0) -> tuple[np.ndarray, np.ndarray]:
    """Logits of a 3-class model that is right ~75% of the time but reports ~99% confidence."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 3, n)
    predicted = np.where(rng.random(n) < 0.75, y, (y + rng.integers(1, 3, n)) % 3)
    logits = rng.normal(0, 0.3, (n, 3))
    logits[np.arange(n), predicted] += 1.0
    return logits * sharpness, y


def test_temperature_scaling_lowers_ece_of_an_overconfident_model_on_new_data():
    fit_logits, fit_y = overconfident(400, seed=0)
    new_logits, new_y = overconfident(400, seed=1)
    temperature = fit_temperature(fit_logits, fit_y)
    assert temperature > 2  # softens: the model claims more than it knows
    before = expected_calibration_error(softmax(new_logits), new_y)
    after = expected_calibration_error(softmax(new_logits, temperature), new_y)
    assert before > 0.15 and after < before / 2
    # Scaling never changes the predicted class.
    assert (softmax(new_logits, temperature).argmax(1) == new_logits.argmax(1)).all()


def test_a_calibrated_model_keeps_a_temperature_near_one():
    rng = np.random.default_rng(3)
    logits = rng.normal(0, 2, (3000, 3))
    y = np.array([rng.choice(3, p=p) for p in softmax(logits)])  # labels drawn from the model's own probabilities
    assert fit_temperature(logits, y) == pytest.approx(1.0, abs=0.15)
    assert expected_calibration_error(softmax(logits), y) < 0.04


def test_a_perfect_validation_split_cannot_drive_the_temperature_to_zero():
    logits = np.eye(3)[[0, 1, 2] * 10] * 3.0
    assert fit_temperature(logits, [0, 1, 2] * 10) >= 0.25


def test_referral_threshold_is_at_least_the_target_and_rises_to_catch_confident_covid_misses():
    # Class 0 is Covid. All correct: the threshold is the target confidence itself.
    probs = np.array([[0.99, 0.005, 0.005], [0.01, 0.98, 0.01], [0.02, 0.01, 0.97], [0.9, 0.05, 0.05]])
    assert referral_threshold(probs, [0, 1, 2, 0], positive=0, target=0.95) == 0.95
    # A Covid film called Normal with 0.97 confidence: sensitivity (detected or referred) is 1/2 until the
    # threshold passes 0.97, so the threshold rises just above it.
    miss = np.array([[0.99, 0.005, 0.005], [0.02, 0.97, 0.01]])
    threshold = referral_threshold(miss, [0, 0], positive=0, target=0.95)
    assert threshold > 0.97
    assert referral_summary(miss, [0, 0], refer(miss, None, threshold), positive=0)["covid_sensitivity_with_referral"] == 1.0


def test_referral_summary_counts_referred_and_the_accuracy_of_the_rest():
    probs = np.array([[0.9, 0.05, 0.05], [0.1, 0.8, 0.1], [0.6, 0.3, 0.1], [0.2, 0.2, 0.6]])
    y = [0, 1, 1, 0]
    summary = referral_summary(probs, y, np.array([False, False, True, True]), positive=0)
    assert summary == {"n": 4, "referred_rate": 0.5, "accuracy_not_referred": 1.0, "confidently_wrong_rate": 0.0,
                       "covid_sensitivity_with_referral": 1.0}
    # Nothing referred: the two wrong answers would be acted on.
    assert referral_summary(probs, y, np.zeros(4, bool), positive=0)["confidently_wrong_rate"] == 0.5


def test_refer_when_out_of_distribution_or_below_the_threshold():
    probs = np.array([[0.99, 0.005, 0.005], [0.6, 0.3, 0.1], [0.98, 0.01, 0.01]])
    assert refer(probs, None, 0.95).tolist() == [False, True, False]
    assert refer(probs, [False, False, True], 0.95).tolist() == [False, True, True]
    assert not refer(probs, [False, False, False], 0.0).any()
