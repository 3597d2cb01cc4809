"""Do a site's films look like the training data? Answered without labels, from what the model says
about them: `covid-xray check-site` on a folder, and the server over its recent requests.

Validation (films of the training sources the model never trained on) says what in-distribution films
look like: how often they are referred, how far their features lie from the training films' (the guard's
score), and the training class mix. A site is *shifted* when its films are referred more often than
validation's (Fisher's exact test, one-sided at ALPHA), or lie farther from the training films by a large
margin: the Mann–Whitney U test one-sided at ALPHA *and* a large effect, a site film farther than a
validation film with probability at least LARGE_EFFECT. With hundreds of films the test alone finds
differences too small to matter (the Kaggle test split's children's Normal films, say), and validation
has only a few dozen films to compare with. The predicted class mix is reported against the training mix
but does not decide: a site may simply see more Covid.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from threading import Lock
from typing import Any

import numpy as np

ALPHA = 0.01
# The probability of superiority that corresponds to Cohen's d = 0.8, a "large" effect (Ruscio 2008).
LARGE_EFFECT = 0.71
# Fewer films than this say too little about a site to call it shifted either way.
MIN_FILMS = 30
WINDOW = 200  # the server's rolling window of recent films


@dataclass(frozen=True)
class Reference:
    """What validation predicts for in-distribution films; stored in the bundle's config.json."""

    n: int
    referred: int
    scores: list[float]  # the guard's score of every validation film
    class_mix: dict[str, float]  # share of each class among the training films

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "scores": [round(s, 6) for s in self.scores]}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Reference:
        return cls(int(d["n"]), int(d["referred"]), [float(s) for s in d["scores"]], dict(d["class_mix"]))


@dataclass(frozen=True)
class SiteCheck:
    n: int
    shifted: bool | None  # None: fewer than MIN_FILMS films
    referred_rate: float
    expected_referred: tuple[float, float]  # 95% interval of validation's rate
    referred_p: float
    score_p: float  # Mann–Whitney U: the site's guard scores larger than validation's
    score_effect: float  # P(a site film's score > a validation film's): 0.5 alike, 1 every one farther
    median_score: float
    expected_median_score: float
    class_mix: dict[str, float]
    training_mix: dict[str, float]
    reasons: list[str]

    @property
    def verdict(self) -> str:
        if self.shifted is None:
            return f"too few films to tell ({self.n}; need at least {MIN_FILMS})"
        if self.shifted:
            return ("shifted: these films do not look like the training data (" + "; ".join(self.reasons)
                    + "). Validate on labelled films of this site before acting on its predictions")
        return "not shifted: these films look like the training data's validation films"

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "verdict": self.verdict}


def check(reference: Reference, scores: Sequence[float], referred: Sequence[bool], labels: Sequence[str]) -> SiteCheck:
    """The site's films as the model saw them: each film's guard score, `refer` flag and predicted label."""
    from scipy.stats import binomtest, fisher_exact, mannwhitneyu

    n, k = len(scores), int(np.sum(referred))
    interval = binomtest(reference.referred, reference.n).proportion_ci(method="wilson") if reference.n else None
    expected = (round(interval.low, 4), round(interval.high, 4)) if interval else (0.0, 1.0)
    if not n:
        return SiteCheck(0, None, 0.0, expected, 1.0, 1.0, 0.5, 0.0, round(float(np.median(reference.scores)), 4),
                         {c: 0.0 for c in reference.class_mix}, reference.class_mix, [])
    referred_p = fisher_exact([[k, n - k], [reference.referred, reference.n - reference.referred]],
                              alternative="greater").pvalue
    test = mannwhitneyu(scores, reference.scores, alternative="greater")
    effect = float(test.statistic / (n * len(reference.scores)))  # the probability of superiority
    reasons = []
    if referred_p < ALPHA:
        reasons.append(f"{k / n:.0%} referred, validation predicts {expected[0]:.0%}–{expected[1]:.0%}")
    if test.pvalue < ALPHA and effect >= LARGE_EFFECT:
        reasons.append(f"farther from the training films than validation films are: {effect:.0%} of comparisons, "
                       f"p = {test.pvalue:.1g}")
    return SiteCheck(
        n=n, shifted=bool(reasons) if n >= MIN_FILMS else None, referred_rate=round(k / n, 4),
        expected_referred=expected, referred_p=float(f"{referred_p:.3g}"), score_p=float(f"{test.pvalue:.3g}"),
        score_effect=round(effect, 4), median_score=round(float(np.median(scores)), 4),
        expected_median_score=round(float(np.median(reference.scores)), 4),
        class_mix={c: round(sum(label == c for label in labels) / n, 4) for c in reference.class_mix},
        training_mix=reference.class_mix, reasons=reasons,
    )


def check_predictions(reference: Reference, predictions: Iterable[dict[str, Any]]) -> SiteCheck:
    """From prediction documents (`Predictor.result`, the endpoint's `predictions`)."""
    predictions = list(predictions)
    return check(reference, [p["ood_score"] for p in predictions], [p["refer"] for p in predictions],
                 [p["label"] for p in predictions])


class RollingCheck:
    """The server's view of its recent films: the last WINDOW predictions, checked on demand."""

    def __init__(self, reference: Reference, window: int = WINDOW):
        self.reference = reference
        self._recent: deque[dict[str, Any]] = deque(maxlen=window)
        self._lock = Lock()

    def add(self, predictions: Iterable[dict[str, Any]]) -> None:
        # Only what the check needs: no image, no file name, nothing that identifies a patient.
        kept = [{"ood_score": p["ood_score"], "refer": p["refer"], "label": p["label"]} for p in predictions]
        with self._lock:
            self._recent.extend(kept)

    def check(self) -> SiteCheck:
        with self._lock:
            recent = list(self._recent)
        return check_predictions(self.reference, recent)


def table(result: SiteCheck) -> str:
    """`covid-xray check-site`'s short table, Markdown."""
    lines = ["| | this site | validation predicts | p |", "| --- | ---: | ---: | ---: |",
             f"| films | {result.n} | | |",
             f"| referred | {result.referred_rate:.1%} | {result.expected_referred[0]:.1%}–"
             f"{result.expected_referred[1]:.1%} | {result.referred_p:.2g} |",
             f"| median distance to training films | {result.median_score:.3f} | {result.expected_median_score:.3f} "
             f"| {result.score_p:.2g} |",
             f"| farther than a validation film | {result.score_effect:.0%} of comparisons | 50% | |"]
    lines += [f"| called {c} | {share:.1%} | {result.training_mix.get(c, 0):.1%} of training films | |"
              for c, share in result.class_mix.items()]
    return "\n".join(lines)
