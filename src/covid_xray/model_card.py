"""MODEL_CARD.md: what the model is for, what it was trained on, how good it is, and where it fails.

Written into every bundle at training time, from the same numbers as report.md, so the card that
travels with the model can never disagree with the run that made it.
"""

from __future__ import annotations

from typing import Any

from . import __version__, audit, evaluation

FILE = "MODEL_CARD.md"


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
        f"{heading} Referral rule",
        "",
        f"`refer` is set when the image is out of distribution or the calibrated confidence is below "
        f"{referral['threshold']:.3f}, the threshold chosen on validation for a Covid sensitivity (detected or referred) "
        f"of at least {referral['target_covid_sensitivity']:.0%}.",
        "",
        "| split | referred | accuracy of the rest | Covid detected or referred |",
        "| --- | ---: | ---: | ---: |",
    ]
    for split in ("val", "test"):
        r = referral[split]
        lines.append(f"| {split} | {_pct(r['referred_rate'])} | {_pct(r['accuracy_not_referred'])} "
                     f"| {_pct(r.get('covid_sensitivity_with_referral'))} |")
    return "\n".join(lines)


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.1%}"


def render(config: dict[str, Any], metrics: dict[str, Any], audit_report: audit.AuditReport) -> str:
    d, hp, classes = config["data"], config["hyperparameters"], config["classes"]
    test, dedup = metrics["test"], metrics.get("test_dedup")
    probe = audit_report.probe
    lines = [
        f"# Model card: covid-xray {config['backbone']}",
        "",
        "## Intended use",
        "",
        f"A **triage aid** that sorts chest X-rays into {', '.join(classes)} so that likely Covid cases can be "
        "prioritised while RT-PCR results are pending. It is **not a diagnosis**: every result must be reviewed by a "
        "qualified clinician, and a negative answer must never delay isolation or testing. Act on `refer` and `ood`: "
        "those images need a radiologist, not this model.",
        "",
        "Not intended for: diagnosing Covid-19, children (unless the training data covered them), views other than "
        "frontal chest films, CT, or any image the out-of-distribution guard flags.",
        "",
        "## Model",
        "",
        f"- backbone `{config['backbone']}` (timm), weights `{hp['weights']}`, fine-tuned on "
        f"{config['input_size']}×{config['input_size']} grayscale input; covid-xray {__version__}",
        f"- training: {config['training']['epochs_run']} epochs, selected epoch {config['training']['best_epoch']} by "
        f"validation loss, seed {hp['seed']}",
        "",
        "## Data and its caveats",
        "",
        f"- {d['layout']} layout; images used: " + ", ".join(f"{s} {n}" for s, n in d["counts"].items()),
        f"- data fingerprint `{d['fingerprint'][:16]}…`",
        "- Public Covid X-ray collections mix sources: classes often come from different hospitals, scanners, "
        "age groups and export pipelines, so a model can learn the source instead of the disease. The numbers below "
        "only say how the model does on images like these; they do not transfer to another hospital without a local "
        "evaluation (`covid-xray evaluate`, or train with `--holdout-source`).",
        f"- dataset audit: {d['audit']['exact_duplicate_groups']} groups of exact duplicates, "
        f"{d['audit']['near_duplicate_pairs']} near-duplicate pairs, {d['audit']['leaked_test_images']} test images that "
        "copy training/validation images.",
        "",
        "## Performance on the held-out test split",
        "",
        "The test split was used for nothing but this evaluation. Brackets are 95% bootstrap confidence intervals.",
        "",
        "### All test images",
        "",
        evaluation.metrics_table(test),
        "",
    ]
    if dedup is not None and dedup["excluded"]:
        lines += [f"### Without the {len(dedup['excluded'])} test images that copy training images", "",
                  evaluation.metrics_table(dedup), ""]
    if "per_source" in metrics:
        holdout = d.get("holdout_source")
        lines += ["### Per data source", "",
                  (f"`{holdout}` was held out: the model never saw it, so its row is the best estimate of how the model "
                   "does at a new site. " if holdout else "") + "Each source's test images:", "",
                  evaluation.per_source_table(metrics["per_source"], holdout), ""]
    lines += [
        trust_section(metrics, "##"),
        "",
        "## Shortcut probes",
        "",
        f"- metadata probe: {audit.probe_explanation(probe)}" if probe else "- metadata probe: not run",
        f"- masked lung field: {audit.masked_explanation(metrics['test_masked'])}",
        "",
        "## Known limitations",
        "",
        "- Small data: a few hundred training images and a few dozen test images, so every metric has a wide interval.",
        "- Three classes only: other findings (bacterial pneumonia, tuberculosis, effusion, devices) get one of the three "
        "labels, possibly with high confidence.",
        "- Calibration and the referral threshold were fitted on a small validation split; recheck them on local data.",
        "- The out-of-distribution guard catches images unlike the training X-rays; it cannot catch a chest X-ray "
        "that looks familiar but comes from a population the data did not cover.",
        "",
    ]
    return "\n".join(lines)
