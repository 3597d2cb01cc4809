"""Dataset audit: duplicates and leakage between splits (found by `duplicates`), unreadable files, image
properties per class, the class × source mix, and a shortcut probe on file metadata (can trivial image
properties predict the class?), as JSON and Markdown. A data stage: it needs no trained model.
"""

from __future__ import annotations

import statistics
from collections import Counter, defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .data import Dataset
from .duplicates import (
    HASH_SIZE,
    NEAR_THRESHOLD,
    FileInfo,
    Leak,
    NearPair,
    find_exact_groups,
    find_leaks,
    find_near_pairs,
    inspect_file,
)
from .known_labels import MISLABELLED
from .confounds import SizeConfound, SourceMix, size_confounds, source_mix, source_mix_markdown
from .util import cpu_count, relative_path

PROBE_FEATURES = ("width", "height", "aspect ratio", "mode", "format", "file size", "mean intensity", "std intensity")
INTENSITY_FEATURES = ("mean intensity", "std intensity")


@dataclass(frozen=True)
class ProbeResult:
    accuracy: float  # all trivial properties
    storage_accuracy: float  # storage properties only (no intensity): these carry no medical information
    majority_rate: float
    n: int
    folds: int
    p_value: float  # one-sided binomial test of `accuracy` against the majority rate
    storage_p_value: float
    importances: dict[str, float]  # per feature, summed over one-hot columns
    verdict: str  # "none", "weak" or "strong"

    def to_dict(self) -> dict[str, Any]:
        return {
            "accuracy": round(self.accuracy, 4), "storage_only_accuracy": round(self.storage_accuracy, 4),
            "majority_rate": round(self.majority_rate, 4), "n": self.n, "folds": self.folds,
            "p_value": float(f"{self.p_value:.3g}"), "storage_only_p_value": float(f"{self.storage_p_value:.3g}"),
            "importances": {k: round(v, 3) for k, v in self.importances.items()}, "verdict": self.verdict,
        }


@dataclass
class AuditReport:
    root: Path
    layout: str
    classes: list[str]
    files: list[FileInfo]
    exact_groups: list[list[FileInfo]]  # files sharing one SHA-256, two or more per group
    near_pairs: list[NearPair]  # different bytes, perceptual hashes within near_threshold
    leaks: list[Leak]
    probe: ProbeResult | None
    probe_skipped: str | None  # why the probe could not run (too few images per class)
    near_threshold: int
    source_mix: SourceMix | None = None  # only with several sources
    size_confounds: list[SizeConfound] = field(default_factory=list)

    @property
    def known_mislabelled(self) -> list[tuple[FileInfo, str]]:
        """Files whose label is known to be wrong (`known_labels`), with what they really are."""
        return [(f, MISLABELLED[f.sha256]) for f in self.files if f.sha256 in MISLABELLED]

    @property
    def unreadable(self) -> list[FileInfo]:
        return [f for f in self.files if f.error]

    @property
    def label_conflicts(self) -> list[list[FileInfo]]:
        """The same bytes filed under two or more classes: at least one label is wrong."""
        return [g for g in self.exact_groups if len({f.label for f in g}) > 1]

    @property
    def near_label_conflicts(self) -> list[NearPair]:
        """Near copies under different labels: the same film relabelled, or (rarely) two similar films."""
        return [p for p in self.near_pairs if p.a.label != p.b.label]

    def rel(self, path: Path) -> str:
        return relative_path(path, self.root)

    def per_class(self) -> dict[str, dict[str, Any]]:
        out: dict[str, dict[str, Any]] = {}
        for c in self.classes:
            readable = [f for f in self.files if f.label == c and not f.error]
            out[c] = {
                "images": len(readable),
                "formats": dict(Counter(f.format for f in readable).most_common()),
                "modes": dict(Counter(f.mode for f in readable).most_common()),
                "sizes": dict(Counter(f"{f.width}x{f.height}" for f in readable).most_common()),
                "median_kb": round(statistics.median(f.size_bytes for f in readable) / 1024, 1) if readable else None,
                "mean_intensity": round(statistics.fmean(f.mean for f in readable), 1) if readable else None,
            }
        return out

    def to_dict(self) -> dict[str, Any]:
        def entry(f: FileInfo) -> dict[str, str]:
            return {"path": self.rel(f.path), "split": f.split, "label": f.label}

        return {
            "root": str(self.root),
            "layout": self.layout,
            "files": len(self.files),
            "splits": dict(Counter(f.split for f in self.files)),
            "near_threshold_bits": self.near_threshold,
            "hash": f"phash {HASH_SIZE}x{HASH_SIZE} ({HASH_SIZE ** 2} bits)",
            "unreadable": [{"path": self.rel(f.path), "error": f.error} for f in self.unreadable],
            "exact_duplicates": [
                {"sha256": g[0].sha256, "files": [entry(f) for f in g], "cross_split": _cross_split(g),
                 "labels": sorted({f.label for f in g})}
                for g in self.exact_groups
            ],
            "near_duplicates": [
                {"a": entry(p.a), "b": entry(p.b), "distance": p.distance, "cross_split": p.a.split != p.b.split}
                for p in self.near_pairs
            ],
            "label_conflicts": [[entry(f) for f in g] for g in self.label_conflicts],
            "near_label_conflicts": [[entry(p.a), entry(p.b)] for p in self.near_label_conflicts],
            "leaked_test": [
                {"path": self.rel(leak.path), "kind": leak.kind, "copies": [self.rel(c) for c in leak.copies],
                 "distance": leak.distance}
                for leak in self.leaks
            ],
            "per_class": self.per_class(),
            "metadata_probe": self.probe.to_dict() if self.probe else {"skipped": self.probe_skipped},
            "class_by_source": self.source_mix.to_dict() if self.source_mix else None,
            "size_confounds": [c.to_dict() for c in self.size_confounds],
            "known_mislabelled": [{**entry(f), "is": what} for f, what in self.known_mislabelled],
        }

    def to_markdown(self, heading: str = "##") -> str:
        return _markdown(self, heading)


# --- the audit -----------------------------------------------------------------------------------


def audit_dataset(dataset: Dataset, *, near_threshold: int = NEAR_THRESHOLD, probe: bool = True, seed: int = 0) -> AuditReport:
    """Audit every file of every split of a discovered dataset."""
    samples = [(s.path, split, dataset.classes[s.label], s.source) for split, items in dataset.splits.items() for s in items]
    with ThreadPoolExecutor(max_workers=min(8, cpu_count())) as pool:  # Pillow decodes without the GIL
        files = list(pool.map(lambda t: inspect_file(*t), samples))
    readable = [f for f in files if not f.error]
    exact_groups = find_exact_groups(readable)
    near_pairs = find_near_pairs(readable, near_threshold)
    probe_result, skipped = None, None
    if probe:
        try:
            probe_result = metadata_probe(readable, seed=seed)
        except ValueError as e:
            skipped = str(e)
    return AuditReport(
        root=dataset.root, layout=dataset.layout, classes=list(dataset.classes), files=files,
        exact_groups=exact_groups, near_pairs=near_pairs, leaks=find_leaks(exact_groups, near_pairs),
        probe=probe_result, probe_skipped=skipped, near_threshold=near_threshold,
        source_mix=source_mix(files, dataset.classes, dataset.holdout) if len(dataset.sources) > 1 else None,
        size_confounds=size_confounds(files),
    )


def _cross_split(group: list[FileInfo]) -> bool:
    return len({f.split for f in group}) > 1


# --- shortcut probe: metadata only ---------------------------------------------------------------


def metadata_probe(files: list[FileInfo], *, folds: int = 5, seed: int = 0) -> ProbeResult:
    """Cross-validated accuracy of a random forest that sees only trivial image properties, once with
    all of them and once with the storage properties alone (intensity can reflect disease; storage cannot).

    Exact duplicates are dropped first so that a copy in another fold cannot inflate the score.
    Raises ValueError when a class has too few distinct images for two folds.
    """
    from sklearn.ensemble import RandomForestClassifier
    from sklearn.model_selection import StratifiedKFold

    distinct = list({f.sha256: f for f in files if not f.error}.values())
    labels = np.array([f.label for f in distinct])
    counts = Counter(labels.tolist())
    folds = min(folds, min(counts.values(), default=0))
    if len(counts) < 2 or folds < 2:
        raise ValueError(f"too few distinct images per class for a cross-validated probe ({dict(counts)})")
    x, columns = _probe_features(distinct)
    forest = RandomForestClassifier(n_estimators=100, min_samples_leaf=2, random_state=seed, n_jobs=1)
    cv = StratifiedKFold(folds, shuffle=True, random_state=seed)
    majority = max(counts.values()) / len(labels)
    accuracy, p_value = _cv_accuracy(forest, x, labels, cv, majority)
    storage = np.array([c not in INTENSITY_FEATURES for c in columns])
    storage_accuracy, storage_p_value = _cv_accuracy(forest, x[:, storage], labels, cv, majority)
    importances: dict[str, float] = defaultdict(float)
    for column, value in zip(columns, forest.fit(x, labels).feature_importances_):
        importances[column] += float(value)
    return ProbeResult(
        accuracy=accuracy, storage_accuracy=storage_accuracy, majority_rate=majority, n=len(labels), folds=folds,
        p_value=p_value, storage_p_value=storage_p_value,
        importances=dict(sorted(importances.items(), key=lambda kv: -kv[1])),
        verdict=_probe_verdict(accuracy, majority, p_value),
    )


def _cv_accuracy(model, x: np.ndarray, labels: np.ndarray, cv, majority: float) -> tuple[float, float]:
    """Cross-validated accuracy and its one-sided binomial p-value against the majority rate."""
    from scipy.stats import binomtest
    from sklearn.model_selection import cross_val_predict

    correct = int((cross_val_predict(model, x, labels, cv=cv) == labels).sum())
    return correct / len(labels), float(binomtest(correct, len(labels), majority, alternative="greater").pvalue)


def _probe_features(files: list[FileInfo]) -> tuple[np.ndarray, list[str]]:
    """Numeric columns plus one-hot mode and format; `columns` names each column's feature."""
    modes = sorted({f.mode for f in files})
    formats = sorted({f.format for f in files})
    rows = [
        [f.width, f.height, f.width / max(f.height, 1), np.log(max(f.size_bytes, 1)), f.mean, f.std]
        + [f.mode == m for m in modes] + [f.format == m for m in formats]
        for f in files
    ]
    columns = ["width", "height", "aspect ratio", "file size", "mean intensity", "std intensity"]
    columns += ["mode"] * len(modes) + ["format"] * len(formats)
    return np.asarray(rows, dtype=np.float64), columns


def _above_chance(accuracy: float, majority: float, p_value: float) -> bool:
    return p_value < 0.01 and accuracy - majority >= 0.05


def _probe_verdict(accuracy: float, majority: float, p_value: float) -> str:
    if not _above_chance(accuracy, majority, p_value):
        return "none"
    return "strong" if accuracy - majority >= 0.2 or accuracy >= 0.9 else "weak"


def probe_explanation(probe: ProbeResult) -> str:
    """What the metadata probe's numbers suggest, in plain words."""
    numbers = f"cross-validated accuracy {probe.accuracy:.1%} against a majority-class rate of {probe.majority_rate:.1%}"
    if probe.verdict == "none":
        return f"At chance level ({numbers}): trivial image properties do not reveal the class."
    top = ", ".join(f"{k} {v:.2f}" for k, v in list(probe.importances.items())[:3])
    text = (f"Trivial image properties alone predict the class {'far' if probe.verdict == 'strong' else 'somewhat'} "
            f"above chance ({numbers}; most informative: {top}). ")
    storage = f"Size, mode, format and file size alone reach {probe.storage_accuracy:.1%}"
    if _above_chance(probe.storage_accuracy, probe.majority_rate, probe.storage_p_value):
        return text + (f"{storage}: the classes differ in how their images were produced or stored, which carries no "
                       "medical information. A CNN can learn that difference instead of the disease, so expect test "
                       "accuracy on this data to overstate accuracy on X-rays from a new source.")
    return text + (f"{storage}, near chance: the signal is in overall brightness and contrast, which may partly be "
                   "disease and partly exposure or post-processing that differs between the sources of each class.")


# --- Markdown -------------------------------------------------------------------------------------


def _markdown(r: AuditReport, h: str) -> str:
    splits = Counter(f.split for f in r.files)
    cross = [g for g in r.exact_groups if _cross_split(g)]
    near_cross = [p for p in r.near_pairs if p.a.split != p.b.split]
    exact_leaks = sum(leak.kind == "exact" for leak in r.leaks)
    lines = [
        f"{h} Dataset audit",
        "",
        f"- {len(r.files)} files ({r.layout} layout): " + ", ".join(f"{s} {n}" for s, n in splits.items()),
        f"- unreadable files: {len(r.unreadable)}",
        f"- exact duplicates (same SHA-256): {len(r.exact_groups)} groups, {len(cross)} of them across splits",
        f"- near duplicates (perceptual hash within {r.near_threshold} of {HASH_SIZE ** 2} bits): "
        f"{len(r.near_pairs)} pairs, {len(near_cross)} of them across splits",
        f"- the same image under two labels: {len(r.label_conflicts)} exact, {len(r.near_label_conflicts)} near",
        f"- **test images that are copies of training/validation images: {len(r.leaks)}** "
        f"({exact_leaks} exact, {len(r.leaks) - exact_leaks} near)",
    ]
    if r.source_mix:
        lines += ["", *source_mix_markdown(r.source_mix, r.classes, h)]
    if r.known_mislabelled:
        lines += ["", f"{h}# Labels known to be wrong", "",
                  f"**{len(r.known_mislabelled)} files are known to be mislabelled** (recognised by their SHA-256; "
                  "`benchmarks/without_sars.py` writes a manifest without them):", ""]
        lines += [f"- {_tagged(r, f)}, filed as {f.label}: {what}" for f, what in r.known_mislabelled]
    if r.size_confounds:
        lines += ["", f"{h}# Class × native size", ""] + [f"- **{c.explanation()}**" for c in r.size_confounds]
    if r.leaks:
        lines += ["", f"{h}# Test images leaked from training", "", "| test image | copy of | kind | distance (bits) |",
                  "| --- | --- | --- | --- |"]
        lines += [f"| {r.rel(x.path)} | {', '.join(r.rel(c) for c in x.copies)} | {x.kind} | {x.distance} |" for x in r.leaks]
    if r.unreadable:
        lines += ["", f"{h}# Unreadable files", ""] + [f"- {r.rel(f.path)}: {f.error}" for f in r.unreadable]
    if r.exact_groups:
        lines += ["", f"{h}# Exact duplicates", "", "| files (split) | labels |", "| --- | --- |"]
        lines += [f"| {', '.join(_tagged(r, f) for f in g)} | {', '.join(sorted({f.label for f in g}))} |"
                  for g in r.exact_groups]
    if r.near_pairs:
        lines += ["", f"{h}# Near duplicates", "", "| image (split) | near copy (split) | distance (bits) |",
                  "| --- | --- | --- |"]
        lines += [f"| {_tagged(r, p.a)} | {_tagged(r, p.b)} | {p.distance} |" for p in r.near_pairs]
    lines += ["", f"{h}# Image properties per class", "",
              "| class | images | formats | modes | sizes (W×H) | median file size | mean intensity |",
              "| --- | --- | --- | --- | --- | --- | --- |"]
    for c, s in r.per_class().items():
        lines.append(f"| {c} | {s['images']} | {_counts(s['formats'])} | {_counts(s['modes'])} | {_counts(s['sizes'])} | "
                     f"{s['median_kb']} KB | {s['mean_intensity']} |")
    lines += ["", f"{h}# Shortcut probe: metadata only", ""]
    if r.probe:
        lines += [f"A random forest that sees only {', '.join(PROBE_FEATURES)} ({r.probe.folds}-fold cross-validation "
                  f"on {r.probe.n} distinct images; binomial p = {r.probe.p_value:.2g}):", "",
                  f"**{probe_explanation(r.probe)}**"]
    else:
        lines.append(f"Skipped: {r.probe_skipped}.")
    return "\n".join(lines)


def _tagged(r: AuditReport, f: FileInfo) -> str:
    # The split is not always the folder: validation is carved out of train/.
    return f"{r.rel(f.path)} ({f.split})"


def _counts(counter: dict[str, int], top: int = 3) -> str:
    items = list(counter.items())
    text = ", ".join(f"{k} {v}" for k, v in items[:top])
    return text + (f", … ({len(items) - top} more)" if len(items) > top else "")
