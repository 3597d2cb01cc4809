"""MODEL_CARD.md: what the model is for, what it was trained on, how good it is, and where it fails.

Written into every bundle at training time, from the same numbers as report.md, so the card that
travels with the model can never disagree with the run that made it.
"""

from __future__ import annotations

from typing import Any

from . import __version__, audit, report
from .bundle import BundleConfig

FILE = "MODEL_CARD.md"


def _data_warnings(found: dict[str, Any]) -> list[str]:
    """What the audit found that the training data gets wrong or lets the model read instead of the disease."""
    lines = [f"- **{n} files of the data filed as {label} are known to be mislabelled** (e.g. SARS figures from a "
             "2004 article, not COVID-19; `audit.json` → `known_mislabelled` lists them): where they are training "
             f"films, the model learned them as {label}." for label, n in (found.get("known_mislabelled") or {}).items()]
    lines += [f"- **Native size × class**: {c['share']:.0%} of the `{c['label']}` files of source `{c['source']}` are "
              f"{c['size']}, against {c['others']:.0%} of its other files; the size, or the resampling texture it "
              "leaves, can stand in for the class." for c in found.get("size_confounds") or []]
    return lines


def render(config: BundleConfig, metrics: dict[str, Any], audit_report: audit.AuditReport) -> str:
    d, hp, classes = config.data, config.hyperparameters, config.classes
    test, dedup = metrics["test"], metrics.get("test_dedup")
    probe = audit_report.probe
    lines = [
        f"# Model card: covid-xray {config.backbone}",
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
        f"- backbone `{config.backbone}` (timm), weights `{hp.weights}`, fine-tuned on "
        f"{config.input_size}×{config.input_size} grayscale input; covid-xray {__version__}",
        f"- training: {config.training['epochs_run']} epochs, selected epoch {config.training['best_epoch']} by "
        f"validation loss, seed {hp.seed}",
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
        *_data_warnings(d["audit"]),
        *([f"- {len(d['dropped_mislabelled'])} files known to be mislabelled were left out before the splits were "
           "made (`config.json` → `data.dropped_mislabelled`)."] if d.get("dropped_mislabelled") else []),
        "",
        "## Performance on the held-out test split",
        "",
        "The test split was used for nothing but this evaluation. Brackets are 95% bootstrap confidence intervals.",
        "",
        "### All test images",
        "",
        report.metrics_table(test),
        "",
    ]
    if dedup is not None and dedup["excluded"]:
        lines += [f"### Without the {len(dedup['excluded'])} test images that copy training images", "",
                  report.metrics_table(dedup), ""]
    if "per_source" in metrics:
        holdout = d.get("holdout_source")
        lines += ["### Per data source", "",
                  (f"`{holdout}` was held out: the model never saw it, so its row is the best estimate of how the model "
                   "does at a new site. " if holdout else "") + "Each source's test images:", "",
                  report.per_source_table(metrics["per_source"], holdout), ""]
    lines += [
        *report.external_section(metrics, classes, "###"),
        report.trust_section(metrics, "##"),
        "",
        "## Shortcut probes",
        "",
        f"- metadata probe: {audit.probe_explanation(probe)}" if probe else "- metadata probe: not run",
        f"- masked lung field: {report.masked_explanation(metrics['test_masked'])}",
        *(f"- native size: {line}" for line in report.size_swap_lines(metrics.get("size_swap", []))),
        "",
        "## Known limitations",
        "",
        "- Small data: a few hundred training images and a few dozen test images, so every metric has a wide interval.",
        "- Three classes only: other findings (bacterial pneumonia, tuberculosis, effusion, devices) get one of the three "
        "labels, possibly with high confidence.",
        "- Calibration and the referral threshold were fitted on a small validation split; recheck them on local data.",
        "- The out-of-distribution guard catches images unlike the training X-rays, and the class distance films "
        "unlike the training films of the class they are called; neither catches a film from a population the data "
        "did not cover that the model's features place among a class's training films. Run `covid-xray check-site` "
        "on a new site's films, and evaluate on its labelled films (`covid-xray evaluate --external`), before use.",
        "",
    ]
    return "\n".join(lines)
