"""The Markdown a reader sees: metrics with their confidence intervals, per-source results and the
confusion matrix as tables, the masked lung-field probe and the trust figures (calibration, guard,
referral) in plain words, and the training run's report.md built from them.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .metrics import PER_CLASS

if TYPE_CHECKING:  # types only: this module renders what later stages produce
    from .audit import AuditReport
    from .bundle import BundleConfig
    from .config import TrainConfig
    from .training import FitResult


def _fmt(value, interval) -> str:
    if value is None:
        return "n/a"
    lo, hi = interval
    return f"{value:.3f} ({lo:.3f}–{hi:.3f})" if lo is not None else f"{value:.3f}"


def metrics_table(metrics: dict[str, Any]) -> str:
    ci = metrics["ci95"]
    rows = [
        f"Accuracy **{_fmt(metrics['accuracy'], ci['accuracy'])}**, macro AUC {_fmt(metrics['macro_auc'], ci['macro_auc'])}, "
        f"n = {metrics['n']} images. Brackets: 95% bootstrap confidence intervals ({metrics['bootstrap_resamples']} resamples).",
        "",
        "| class | sensitivity | specificity | precision | F1 | AUC |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for c, m in metrics["per_class"].items():
        cells = [_fmt(m[k], ci["per_class"][c][k]) for k in PER_CLASS]
        rows.append(f"| {c} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def per_source_table(per_source: dict[str, dict[str, Any]], holdout: str | None = None) -> str:
    """One row per source: n, accuracy with its CI, each class's sensitivity, macro AUC."""
    classes = list(next(iter(per_source.values()))["per_class"])
    rows = ["| source | n | accuracy | " + " | ".join(f"sensitivity {c}" for c in classes) + " | macro AUC |",
            "| --- |" + " --- |" * (len(classes) + 3)]
    for name, m in per_source.items():
        sensitivity = [_fmt(m["per_class"][c]["sensitivity"], (None, None)) for c in classes]
        label = f"{name} (held out)" if name == holdout else name
        rows.append(f"| {label} | {m['n']} | {_fmt(m['accuracy'], m['ci95']['accuracy'])} | " + " | ".join(sensitivity)
                    + f" | {_fmt(m['macro_auc'], (None, None))} |")
    return "\n".join(rows)


def confusion_table(metrics: dict[str, Any], classes: list[str]) -> str:
    rows = ["| true \\ predicted | " + " | ".join(classes) + " |", "| --- |" + " --- |" * len(classes)]
    for c, row in zip(classes, metrics["confusion_matrix"]):
        rows.append(f"| {c} | " + " | ".join(str(v) for v in row) + " |")
    return "\n".join(rows)


def size_swap_lines(swaps: list[dict[str, Any]]) -> list[str]:
    """The native-size probe's results (`evaluation.size_swap_probe`), as a sentence each."""
    return [f"`{s['class']}` test films of `{s['source']}` (stored at {s['size']}) called {s['class']}: "
            f"{s['class_called_class']:.0%} as stored, {s['class_called_class_restored']:.0%} re-stored at "
            f"{s['other_size']}; its other classes' films called {s['class']}: {s['others_called_class']:.0%} as "
            f"stored, {s['others_called_class_restored']:.0%} re-stored at {s['size']}. "
            + ("The native size carries the class for this model: do not trust it on films stored otherwise."
               if s["class_called_class"] - s["class_called_class_restored"] >= 0.2
               or s["others_called_class_restored"] - s["others_called_class"] >= 0.2
               else "Re-storing changes little: the model does not read the class from the size.")
            for s in swaps]


def masked_explanation(probe: dict[str, float]) -> str:
    """What the masked probe's numbers suggest, in plain words."""
    full, hidden, only, majority = probe["full"], probe["centre_hidden"], probe["centre_only"], probe["majority_rate"]
    numbers = (f"Accuracy {full:.1%} on the full images, {hidden:.1%} with the central lung field hidden, "
               f"{only:.1%} with only the lung field shown (majority-class rate {majority:.1%}). ")
    surroundings = "corners with text markers, borders, collimation, shoulders, image geometry"
    gain_full, gain_hidden, gain_only = full - majority, hidden - majority, only - majority
    if gain_hidden >= 0.1 and gain_hidden >= 0.5 * gain_full:
        verdict = (f"The model still classifies well without seeing the lung field: it relies substantially on what "
                   f"lies around it ({surroundings}), a shortcut unlikely to carry over to X-rays from other hospitals.")
    elif gain_hidden >= 0.1:
        verdict = (f"With the lung field hidden it still scores well above chance: the surroundings ({surroundings}) "
                   "carry class information that the model uses alongside the lungs, and that part may not carry "
                   "over to X-rays from other hospitals.")
    elif gain_only >= 0.5 * gain_full:
        verdict = ("Without the lung field it falls to chance and with only the lung field it keeps most of its "
                   "accuracy: the model mainly uses the lungs.")
    else:
        verdict = "Neither part alone carries the accuracy: the model needs the whole image."
    return numbers + verdict + (" (Masked images look unlike any training image, so both masked accuracies "
                                "understate what each part carries.)")


def trust_section(metrics: dict[str, Any], heading: str = "##") -> str:
    """Calibration, the out-of-distribution guard and the referral rule, in numbers and words."""
    cal, guard, referral = metrics["calibration"], metrics["ood"], metrics["referral"]
    ece = cal["ece"]
    lines = [
        f"{heading} Calibration",
        "",
        f"Temperature scaling fitted on the validation split: T = {cal['temperature']:.3f} "
        f"({'sharpens' if cal['temperature'] < 1 else 'softens'} the probabilities). Expected calibration error "
        "(10 bins; lower is better):",
        "",
        "| split | before | after |",
        "| --- | ---: | ---: |",
        *(f"| {split}{' (fitted on it)' if split == 'val' else ''} | {e['before']:.3f} | {e['after']:.3f} |"
          for split, e in ece.items()),
        "",
        "With a few dozen validation images the temperature itself is uncertain; the test row is the honest one.",
        "",
        f"{heading} Out-of-distribution guard",
        "",
        f"Every prediction carries `ood_score`, the cosine distance of the image's features to its "
        f"{guard['k']}th-nearest training X-ray, and `ood` = score > {guard['threshold']:.4f} (the largest validation "
        f"score × {guard['margin']:g}). Flagged: "
        + ", ".join(f"{rate:.1%} of {split} X-rays" for split, rate in guard["flagged_rate"].items() if rate is not None)
        + f"; synthetic non-X-rays (noise, blank, documents, patterns): {guard['synthetic_outliers_flagged']:.0%}. "
        "A flagged image gets no usable answer. `benchmarks/ood.py` measures the guard on photos, other body parts "
        "and modalities, and chest films from another scanner.",
        "",
        *_class_distance_lines(guard),
        f"{heading} Referral rule",
        "",
        f"`refer` is set when the image is out of distribution, unlike the training films of the class it is called, "
        f"or its calibrated confidence is below {referral['threshold']:.3f}, the threshold chosen on validation for a "
        f"Covid sensitivity (detected or referred) of at least {referral['target_covid_sensitivity']:.0%}; "
        "`refer_reasons` says which. Confidently wrong: wrong and not referred, the answers a triage team would act on.",
        "",
        "| split | referred | accuracy of the rest | confidently wrong | Covid detected or referred |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for split, r in referral.items():
        if isinstance(r, dict):
            lines.append(f"| {split} | {_pct(r['referred_rate'])} | {_pct(r['accuracy_not_referred'])} "
                         f"| {_pct(r.get('confidently_wrong_rate'))} | {_pct(r.get('covid_sensitivity_with_referral'))} |")
    return "\n".join(lines)


def _class_distance_lines(guard: dict[str, Any]) -> list[str]:
    distance = guard.get("class_distance")
    if not distance:
        return []
    rates = guard.get("class_distance_flagged_rate", {})
    return [
        f"Every prediction also carries `class_distance`, the {distance['method']}, and `atypical` = distance > "
        f"{distance['threshold']:.3f} ({distance['fitted_on']}): a film unlike the training films of the class it "
        "is called — e.g. an older adult's Normal film called Covid because every such film in training was Covid. "
        "Flagged: " + ", ".join(f"{rate:.1%} of {split}" for split, rate in rates.items() if rate is not None) + ".",
        "",
    ]


def external_section(metrics: dict[str, Any], classes: list[str], heading: str = "##") -> list[str]:
    """Another site's films (`train --external`), next to the test split: what a new hospital should expect."""
    if "external" not in metrics:
        return []
    r, source = metrics["referral"].get("external", {}), metrics["external"]["source"]
    return [
        f"{heading} Another site: every film of `{source}` (never trained on or selected on)",
        "",
        metrics_table(metrics["external"]),
        "",
        confusion_table(metrics["external"], classes),
        "",
        f"Referred {_pct(r.get('referred_rate'))}; accuracy of the rest {_pct(r.get('accuracy_not_referred'))}; "
        f"confidently wrong {_pct(r.get('confidently_wrong_rate'))}; Covid detected or referred "
        f"{_pct(r.get('covid_sensitivity_with_referral'))}.",
        "",
        *[f"- {line}" for line in cannot_teach(metrics["external"], classes, source)],
        "",
    ]


def cannot_teach(metrics: dict[str, Any], classes: list[str], source: str, share: float = 0.25) -> list[str]:
    """Plain statements of what the training data did not teach, from another site's confusion matrix: every
    class whose films that site's model called another class at least `share` of the time."""
    matrix = np.asarray(metrics["confusion_matrix"])
    lines = []
    for i, true in enumerate(classes):
        n = matrix[i].sum()
        for j, called in enumerate(classes):
            if i != j and n and matrix[i, j] / n >= share:
                lines.append(f"{matrix[i, j]} of {n} {true} films of `{source}` were called {called}: the training "
                             f"{true} films do not cover films like these (another hospital, scanner or age group). "
                             f"Expect such films to be called {called} or referred.")
    return lines


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.1%}"


def _frozen_note(frozen: int, hp: TrainConfig) -> str:
    return f" with {frozen:,} pretrained parameters fixed (down to 1/{hp.freeze_stride} resolution)" if frozen else " of every layer"


def _source_lines(d: dict[str, Any]) -> list[str]:
    if len(d["sources"]) == 1:
        return []
    return ["- sources (each split on its own, then joined):"] + [
        f"  - `{name}`: {s['layout']} layout, carved {', '.join(s['carved_splits']) or 'nothing'}; "
        + ", ".join(f"{split} {n}" for split, n in s["counts"].items())
        + (" — **held out**: never trained on, all its images are the test split" if name == d["holdout_source"] else "")
        for name, s in d["sources"].items()
    ]


def _sources_section(config: BundleConfig, metrics: dict[str, Any]) -> list[str]:
    """The held-out source against the training sources' own test split, and every source's results."""
    if "per_source" not in metrics:
        return []
    holdout = config.data["holdout_source"]
    lines = []
    if holdout:
        lines += [
            "## Test results on the training sources' own test split (in-distribution)",
            "",
            f"The test results above are on `{holdout}`, a source the model never saw. These are on the test split of "
            "the sources it was trained on; the gap between the two is what a new hospital should expect to lose.",
            "",
            metrics_table(metrics["test_in_sources"]),
            "",
        ]
    return lines + [
        "## Per-source results",
        "",
        "Each source's test images" + (f" (all images of the held-out `{holdout}`)" if holdout else "")
        + "; with few images per source the confidence intervals are wide. A source far below the others is one "
        "this model does not carry over to.",
        "",
        per_source_table(metrics["per_source"], holdout),
        "",
    ]


def _timing(timing: dict[str, Any]) -> str:
    backend = "ONNX Runtime" if timing["post_fit_backend"] == "onnx" else "PyTorch"
    return (f"data and audit {timing['setup_seconds']} s, fit {timing['fit_seconds']} s, after the fit (evaluation, "
            f"calibration, guard, probes, export) {timing['post_fit_seconds']} s on {backend}")


def write_report(
    run_dir: Path, config: BundleConfig, metrics: dict[str, Any], fitted: FitResult, plots: list[str],
    audit_report: AuditReport,
) -> Path:
    classes = config.classes
    d = config.data
    hp = config.hyperparameters
    lines = [
        "# covid-xray training report",
        "",
        "A triage aid to read while RT-PCR results are pending — not a diagnosis.",
        "",
        "## Data",
        f"- layout: {d['layout']}; images used: " + ", ".join(f"{s} {n}" for s, n in d["counts"].items()),
        *_source_lines(d),
        f"- splits carved by covid-xray (stratified, split seed {hp.split_seed}): {', '.join(d['carved_splits']) or 'none'}; "
        "the exact split of every file is in `splits.csv`",
        "- the **test split was used for nothing but this evaluation**: early stopping and model selection used validation only",
        f"- unreadable images skipped: {len(d['skipped_images'])}" + "".join(f"\n  - {r}" for r in d["skipped_images"]),
        *([f"- files known to be mislabelled, left out: {len(d['dropped_mislabelled'])} ("
           + ", ".join(f"`{p}`" for p in d["dropped_mislabelled"]) + ")"] if d.get("dropped_mislabelled") else []),
        f"- data fingerprint: `{d['fingerprint'][:16]}…`",
        "",
        "## Test results" + (f": held-out source `{d['holdout_source']}`, all its images" if d["holdout_source"] else ""),
        metrics_table(metrics["test"]),
        "",
        confusion_table(metrics["test"], classes),
        "",
        "![confusion](confusion_test.png) ![roc](roc_test.png)",
        "",
        *external_section(metrics, classes, "##"),
        *_sources_section(config, metrics),
        *_dedup_section(metrics, classes),
        trust_section(metrics, "##"),
        "",
        "![reliability](reliability_test.png)",
        "",
        "The bundle carries a model card, `model/MODEL_CARD.md`.",
        "",
        "## Shortcut probe: masked lung field",
        "",
        masked_explanation(metrics["test_masked"]),
        "",
        *(["## Shortcut probe: native size", "", *size_swap_lines(metrics["size_swap"]), ""]
          if "size_swap" in metrics else []),
        audit_report.to_markdown(heading="##"),
        "",
        "## Validation results (used for model selection, so optimistic)",
        metrics_table(metrics["val"]),
        "",
        "## Training",
        f"- backbone `{config.backbone}`, weights `{hp.weights}`, input {config.input_size}×{config.input_size} grayscale",
        f"- head warm-up on frozen features, then fine-tuning{_frozen_note(config.training['frozen_parameters'], hp)}: AdamW (lr {hp.lr}, backbone ×{hp.backbone_lr_scale}), "
        f"warm-up + cosine, label smoothing {hp.label_smoothing}, class-weighted loss, seed {hp.seed}",
        f"- selected epoch {fitted.best_epoch} of {len(fitted.history)} (lowest validation loss); "
        f"{config.training['seconds']} s in total: {_timing(metrics['timing'])}",
        "",
        "![learning curves](learning_curves.png)",
        "",
    ]
    path = run_dir / "report.md"
    path.write_text("\n".join(lines))
    return path


def _dedup_section(metrics: dict[str, Any], classes: list[str]) -> list[str]:
    dedup = metrics.get("test_dedup")
    if dedup is None:
        return ["## Test results without leaked images", "", "Every test image is a copy of a training image: "
                "there is no honest test set.", ""]
    if not dedup["excluded"]:
        return ["No test image is a copy of a training or validation image (see the dataset audit below).", ""]
    return [
        "## Test results without leaked images",
        "",
        f"{len(dedup['excluded'])} test images are exact or near copies of training/validation images; a model can "
        "recognise those instead of classifying them. Without them:",
        "",
        metrics_table(dedup),
        "",
        confusion_table(dedup, classes),
        "",
        "Left out: " + ", ".join(f"`{p}`" for p in dedup["excluded"]),
        "",
    ]


def external_text(result: dict[str, Any], classes: list[str]) -> str:
    """What `evaluate --external` prints: the metrics, the confusion matrix, calibration and the referral table."""
    metrics, referral = result["external"], result["referral"]
    lines = [
        f"every image of `{result['source']}` (never trained on)", "",
        metrics_table(metrics), "", confusion_table(metrics, classes), "",
        f"expected calibration error (10 bins): {result['calibration']['ece']:.3f}", "",
        "| referred | accuracy of the rest | confidently wrong | Covid detected or referred |",
        "| ---: | ---: | ---: | ---: |",
        f"| {_pct(referral['referred_rate'])} | {_pct(referral['accuracy_not_referred'])} "
        f"| {_pct(referral['confidently_wrong_rate'])} | {_pct(referral.get('covid_sensitivity_with_referral'))} |",
    ]
    lines += ["", *cannot_teach(metrics, classes, result["source"])]
    if result["skipped_images"]:
        lines += ["", f"unreadable images skipped: {len(result['skipped_images'])}"]
    return "\n".join(lines)
