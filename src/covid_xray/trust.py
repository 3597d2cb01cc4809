"""What tells a user when not to trust an answer, fitted after training on training/validation outputs only:
the calibration temperature, the out-of-distribution guard and the referral threshold. How they do on
test (and the guard on synthetic non-X-rays) is measured and reported, never used to choose them."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from . import ood
from .site_shift import Reference
from .calibration import calibration_summary, fit_temperature, refer, referral_summary, referral_threshold, softmax

REFERRAL_RULE = ("refer when out of distribution, unlike the training films of the predicted class, "
                 "or calibrated confidence < threshold")


def covid_index(classes: list[str]) -> int | None:
    return next((i for i, c in enumerate(classes) if c.lower().startswith("covid")), None)


@dataclass
class SplitOutputs:
    """A split as the model saw it: its images (the guard also looks at pixels), logits, features, labels."""

    images: Any
    logits: np.ndarray
    features: np.ndarray
    labels: list[int]


@dataclass
class Trust:
    temperature: float
    guard: ood.OODGuard
    referral_threshold: float
    target_covid_sensitivity: float
    # metrics.json's "calibration", "ood" and "referral" entries: how each does on every reported split.
    metrics: dict[str, Any]
    site: Reference  # what validation predicts for a site's films (`covid-xray check-site`)

    def bundle_entries(self) -> dict[str, Any]:
        """What the bundle's config.json records so that every prediction applies the same rule."""
        return {
            "calibration": {"temperature": self.temperature, "fitted_on": "val"},
            "ood": self.guard.config(),
            "referral": {"threshold": round(self.referral_threshold, 6),
                         "target_covid_sensitivity": self.target_covid_sensitivity, "rule": REFERRAL_RULE},
            "site_reference": self.site.to_dict(),
        }


def fit_trust(splits: dict[str, SplitOutputs], classes: list[str], target_sensitivity: float,
              outliers: tuple[np.ndarray, np.ndarray]) -> Trust:
    """Fit on "train" (the guard's feature bank) and "val" (temperature, guard threshold, referral
    threshold); then score every split but train as a prediction is: the guard sees images and features.
    `outliers`: synthetic non-X-ray images and their features, to report what the guard flags."""
    val, train = splits["val"], splits["train"]
    temperature = round(fit_temperature(val.logits, val.labels), 6)
    guard = ood.OODGuard.fit(train.features, val.features, train.labels, val.logits.argmax(1), len(classes))
    covid = covid_index(classes)
    threshold = referral_threshold(softmax(val.logits, temperature), val.labels, covid, target_sensitivity)
    referral: dict[str, Any] = {"threshold": round(threshold, 6), "target_covid_sensitivity": target_sensitivity}
    ood_rates, atypical_rates, val_scores, val_referred = {}, {}, [], 0
    reported = {name: s for name, s in splits.items() if name != "train"}
    for name, split in reported.items():
        probs = softmax(split.logits, temperature)
        scores = guard.score(split.features, split.images)
        flagged = guard.flags(scores)
        atypical = guard.classes.flags(guard.classes.score(split.features, probs.argmax(1)))
        ood_rates[name] = round(float(flagged.mean()), 4) if len(flagged) else None
        atypical_rates[name] = round(float(atypical.mean()), 4) if len(atypical) else None
        referred = refer(probs, flagged, threshold, atypical)
        referral[name] = referral_summary(probs, split.labels, referred, covid)
        if name == "val":
            val_scores, val_referred = scores.tolist(), int(referred.sum())
    outlier_flags = guard.flags(guard.score(outliers[1], outliers[0]))
    metrics = {
        "calibration": calibration_summary({n: s.logits for n, s in reported.items()},
                                           {n: s.labels for n, s in reported.items()}, temperature),
        "ood": {**guard.config(), "flagged_rate": ood_rates, "class_distance_flagged_rate": atypical_rates,
                "synthetic_outliers_flagged": round(float(outlier_flags.mean()), 4)},
        "referral": referral,
    }
    counts = np.bincount(np.asarray(train.labels, int), minlength=len(classes))
    site = Reference(n=len(val.labels), referred=val_referred, scores=val_scores,
                     class_mix={c: round(float(k / counts.sum()), 4) for c, k in zip(classes, counts)})
    return Trust(temperature, guard, threshold, target_sensitivity, metrics, site)
