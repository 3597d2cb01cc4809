"""Is the class confounded with how the data was gathered? Across sources (the class × source mix:
each hospital, scanner or collection contributes its own classes) and within one (a native image size
that only one class has, so the size, or the texture left by resampling to the input size, tells the
class). Part of the audit; a data stage that needs no trained model.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from dataclasses import dataclass
from typing import Any

import numpy as np

from .duplicates import FileInfo

# Cramér's V between source and class: Cohen's conventional "medium" and "large" effects.
CONFOUNDING_WEAK, CONFOUNDING_STRONG = 0.2, 0.5
# A native size is a class's when it covers at least this share of the class's files within a source ...
SIZE_SHARE = 0.8
# ... and at most this share of the source's other files.
SIZE_OTHERS = 0.05


@dataclass(frozen=True)
class SourceMix:
    """How the classes are spread over several data sources: when a source's class mix differs from
    another's, the source (hospital, scanner, post-processing, patients' age) predicts the class."""

    table: dict[str, dict[str, int]]  # source → class → files
    holdout: str | None  # a source only tested on: left out of the measures below
    cramers_v: float | None  # between training source and class: 0 same mix everywhere, 1 the source decides
    p_value: float | None  # chi-square test of independence of training source and class
    single_source_classes: dict[str, str]  # class → the only training source it comes from
    single_class_sources: dict[str, str]  # training source → the only class it holds
    verdict: str  # "none", "weak" or "strong"

    def to_dict(self) -> dict[str, Any]:
        return {
            "table": self.table, "holdout": self.holdout,
            "cramers_v": None if self.cramers_v is None else round(self.cramers_v, 4),
            "p_value": None if self.p_value is None else float(f"{self.p_value:.3g}"),
            "single_source_classes": self.single_source_classes, "single_class_sources": self.single_class_sources,
            "verdict": self.verdict,
        }


def source_mix(files: list[FileInfo], classes: list[str], holdout: str | None = None) -> SourceMix:
    """Files per source and class (unreadable ones too: the question is what the data is made of), and
    how strongly the training sources predict the class: Cramér's V, structural gaps, a verdict."""
    from scipy.stats import chi2_contingency

    table = {s: {c: 0 for c in classes} for s in dict.fromkeys(f.source for f in files)}
    for f in files:
        table[f.source][f.label] += 1
    trained = {s: row for s, row in table.items() if s != holdout}
    if len(trained) < 2:
        return SourceMix(table, holdout, None, None, {}, {}, "none")
    present = [c for c in classes if any(row[c] for row in trained.values())]
    sources_of = {c: [s for s, row in trained.items() if row[c]] for c in present}
    classes_of = {s: [c for c in present if row[c]] for s, row in trained.items()}
    single_source = {c: found[0] for c, found in sources_of.items() if len(found) == 1}
    single_class = {s: found[0] for s, found in classes_of.items() if len(found) == 1}
    counts = np.array([[row[c] for c in present] for row in trained.values()])
    chi2, p, _, _ = chi2_contingency(counts, correction=False)
    v = float(np.sqrt(chi2 / (counts.sum() * (min(counts.shape) - 1))))
    if single_source or single_class or v >= CONFOUNDING_STRONG:
        verdict = "strong"
    elif v >= CONFOUNDING_WEAK and p < 0.01:
        verdict = "weak"
    else:
        verdict = "none"
    return SourceMix(table, holdout, v, float(p), single_source, single_class, verdict)


def source_mix_explanation(mix: SourceMix) -> str:
    """What the class × source table means, in plain words."""
    if mix.cramers_v is None:
        return f"One source to train on (the held-out source {mix.holdout!r} aside): nothing to compare between sources."
    held = f"; the held-out source {mix.holdout!r} is left out, as the model never trains on it" if mix.holdout else ""
    numbers = (f"Cramér's V between source and class {mix.cramers_v:.2f}: 0 means every source has the same class "
               f"mix, 1 that the source alone tells the class; chi-square p = {mix.p_value:.2g}{held})")
    if mix.verdict == "none":
        return f"The classes are spread alike over the sources ({numbers}."
    facts = [f" Class {c!r} comes only from source {s!r}." for c, s in mix.single_source_classes.items()]
    facts += [f" Source {s!r} holds only class {c!r}." for s, c in mix.single_class_sources.items()]
    return (f"Source and class are {'strongly' if mix.verdict == 'strong' else 'somewhat'} confounded ({numbers}."
            + "".join(facts)
            + " A model can learn to recognise the source (hospital, scanner, post-processing, the patients' age) "
            "instead of the disease, and will then answer confidently and wrongly on X-rays from elsewhere. Prefer "
            "sources that each hold every class, and train with --holdout-source to see how a model does on a "
            "source it never saw.")


def source_mix_markdown(mix: SourceMix, classes: list[str], h: str) -> list[str]:
    lines = [f"{h}# Class × source", "", "| source | " + " | ".join(classes) + " | total |",
             "| --- |" + " --- |" * (len(classes) + 1)]
    for source, row in mix.table.items():
        name = f"{source} (held out)" if source == mix.holdout else source
        lines.append(f"| {name} | " + " | ".join(str(row[c]) for c in classes) + f" | {sum(row.values())} |")
    text = source_mix_explanation(mix)
    return lines + ["", f"**{text}**" if mix.verdict != "none" else text]


@dataclass(frozen=True)
class SizeConfound:
    """Within one source, a native size that (nearly) only one class has."""

    source: str
    label: str
    size: str  # W×H
    share: float  # of the class's files in this source
    others: float  # of the source's files of other classes
    other_size: str  # the most common size of the source's other classes' files, W×H

    def to_dict(self) -> dict[str, Any]:
        return {"source": self.source, "label": self.label, "size": self.size, "share": round(self.share, 4),
                "others": round(self.others, 4), "other_size": self.other_size}

    def explanation(self) -> str:
        where = f" in source {self.source!r}" if self.source else ""
        return (f"{self.share:.0%} of the {self.label!r} files{where} are {self.size}, against {self.others:.0%} of its "
                f"other classes' files: the native size, and the texture that resampling it to the input size leaves, "
                f"can tell the class. Training runs the native-size probe on the test split to show whether the model "
                f"learned it; --texture-jitter randomises resolution and compression in training.")


def size_confounds(files: list[FileInfo]) -> list[SizeConfound]:
    """Per source with two classes or more, every class whose most common native size covers at least
    SIZE_SHARE of its files and at most SIZE_OTHERS of the source's other files."""
    by_source: dict[str, list[FileInfo]] = defaultdict(list)
    for f in files:
        if not f.error:
            by_source[f.source].append(f)
    found = []
    for source, items in by_source.items():
        labels = sorted({f.label for f in items})
        if len(labels) < 2:
            continue
        for label in labels:
            mine = [f for f in items if f.label == label]
            others = [f for f in items if f.label != label]
            size, count = Counter((f.width, f.height) for f in mine).most_common(1)[0]
            share = count / len(mine)
            other_share = sum((f.width, f.height) == size for f in others) / len(others)
            if share >= SIZE_SHARE and other_share <= SIZE_OTHERS:
                other = Counter((f.width, f.height) for f in others).most_common(1)[0][0]
                found.append(SizeConfound(source, label, f"{size[0]}×{size[1]}", share, other_share,
                                          f"{other[0]}×{other[1]}"))
    return found
