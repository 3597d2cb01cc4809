"""Candidate referral rules on trained bundles: the Kaggle test split against another site's films.

    python benchmarks/referral.py runs/cross_site/default/seed0 runs/cross_site/default/seed1 ...
                                  [--data DIR] [--external rdb=DIR]

For each run (a `covid-xray train` output, e.g. from `benchmarks/cross_site.py`) it rebuilds the splits as
the bundle was trained, computes every film's logits and penultimate features once, and scores each
candidate rule of docs/experiments.md ("Cross-site: refer films unlike their predicted class's training
films"). Every candidate adds one score to the bundle's own rule (global k-NN guard or low calibrated
confidence) and refers a film when that score exceeds a percentile of the validation films' scores; no
number is fitted on the test split or the external films. Prints, per candidate, the mean over runs of
the referral table on both, and the trade-off as that percentile moves.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from covid_xray.calibration import referral_summary, softmax
from covid_xray.evaluation import external_samples, trained_dataset
from covid_xray.images import decode_samples
from covid_xray.inference import Predictor
from covid_xray.ood import ClassDistance
from covid_xray.trust import covid_index

PERCENTILES = (80, 90, 95, 97.5, 100)
ADOPTION_PERCENTILE = 95


@dataclass
class Split:
    logits: np.ndarray
    features: np.ndarray
    labels: np.ndarray
    base_refer: np.ndarray  # the bundle's own rule

    @property
    def predicted(self) -> np.ndarray:
        return self.logits.argmax(1)


def _normalise(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def class_knn(train: Split, k: int = 5) -> Callable[[Split], np.ndarray]:
    banks = {c: _normalise(train.features[train.labels == c]) for c in np.unique(train.labels)}

    def score(split: Split) -> np.ndarray:
        feats, out = _normalise(split.features), np.zeros(len(split.labels), np.float32)
        for c, bank in banks.items():
            rows = split.predicted == c
            if rows.any():
                sim = feats[rows] @ bank.T
                out[rows] = 1 - np.partition(sim, -min(k, len(bank)), axis=1)[:, -min(k, len(bank))]
        return out

    return score


def class_mahalanobis(train: Split) -> Callable[[Split], np.ndarray]:
    """R2, the candidate adopted: the package's own class distance (`ood.ClassDistance`)."""
    distance = ClassDistance.fit(train.features, train.labels, np.zeros((0, train.features.shape[1])), [])
    return lambda split: distance.score(split.features, split.predicted)


def energy(temperature: float) -> Callable[[Split], np.ndarray]:
    def score(split: Split) -> np.ndarray:
        z = split.logits / temperature
        top = z.max(1)
        return -(temperature * (top + np.log(np.exp(z - top[:, None]).sum(1)))).astype(np.float32)

    return score


def outputs(predictor: Predictor, samples) -> Split:
    decoded = decode_samples(samples, predictor.size)
    images = decoded.images[:]
    logits, features = predictor.outputs(images)
    _, refer = predictor.assess(images)
    return Split(logits, features, np.array([s.label for s in decoded.samples]), refer)


def summary(split: Split, extra: np.ndarray, temperature: float, covid: int) -> dict:
    probs = softmax(split.logits, temperature)
    return referral_summary(probs, split.labels, split.base_refer | extra, covid)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--data", default=os.environ.get("COVID_XRAY_DATA", "../shared/data/Covid19-dataset"))
    parser.add_argument("--external", default="rdb=../shared/data/radiography-dev")
    args = parser.parse_args()

    results: dict[tuple[str, float], list[tuple[dict, dict]]] = {}
    for run in args.runs:
        predictor = Predictor.from_bundle(run / "model")
        config = predictor.config
        dataset = trained_dataset(config, args.data)
        split = {name: outputs(predictor, dataset[name]) for name in ("train", "val", "test")}
        external = outputs(predictor, external_samples(config.classes, args.external))
        t, covid = predictor.temperature, covid_index(config.classes)
        candidates = {"R0 current": None, "R1 class k-NN": class_knn(split["train"]),
                      "R2 class Mahalanobis": class_mahalanobis(split["train"]), "R3 energy": energy(t)}
        for name, score in candidates.items():
            if score is None:
                none = np.zeros(len(split["test"].labels), bool), np.zeros(len(external.labels), bool)
                results.setdefault((name, 0), []).append(
                    (summary(split["test"], none[0], t, covid), summary(external, none[1], t, covid)))
                continue
            val, test, ext = score(split["val"]), score(split["test"]), score(external)
            for pct in PERCENTILES:
                threshold = np.percentile(val, pct)
                results.setdefault((name, pct), []).append(
                    (summary(split["test"], test > threshold, t, covid), summary(external, ext > threshold, t, covid)))

    site = args.external.split("=", 1)[0]
    print(f"mean of {len(args.runs)} runs; threshold: percentile of validation scores "
          f"(adoption rule: {ADOPTION_PERCENTILE})\n")
    keys = ("referred_rate", "accuracy_not_referred", "confidently_wrong_rate", "covid_sensitivity_with_referral")
    print(f"| candidate | percentile | Kaggle referred | accuracy of the rest | confidently wrong | Covid called or "
          f"referred | {site} referred | accuracy of the rest | confidently wrong | Covid called or referred |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for (name, pct), rows in results.items():
        cells = []
        for which in (0, 1):
            mean = {k: np.mean([r[which][k] or 0.0 for r in rows]) for k in keys}
            cells += [f"{mean['referred_rate']:.1%}", f"{mean['accuracy_not_referred']:.3f}",
                      f"{mean['confidently_wrong_rate']:.1%}", f"{mean['covid_sensitivity_with_referral']:.3f}"]
        print(f"| {name} | {pct if pct else '–'} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
