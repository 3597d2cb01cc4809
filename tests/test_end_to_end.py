"""Train on the real dataset with a short schedule: accuracy on the untouched test split."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow


def test_default_training_is_far_above_chance_on_the_test_split(trained_run):
    test = trained_run.metrics["test"]
    assert test["n"] == 66
    # Seed 0 of the default scores 0.864 on a 2-core EPYC (README, cross-site table; seeds 1 and 2: 0.970,
    # 0.955), and another CPU takes another path: a floor well under that but far above the 39% majority rate.
    assert test["accuracy"] >= 0.80, test
    # Every film the model does not refer is right, and every Covid film is called Covid or referred.
    referral = trained_run.metrics["referral"]["test"]
    assert referral["confidently_wrong_rate"] <= 0.03 and referral["covid_sensitivity_with_referral"] == 1.0, referral
    lo, hi = test["ci95"]["accuracy"]
    assert lo <= test["accuracy"] <= hi
    saved = json.loads((trained_run.run_dir / "metrics.json").read_text())
    assert saved["test"]["accuracy"] == test["accuracy"] and "val" in saved


def test_bundle_predicts_real_test_images_from_the_command_line(trained_run, dataset_dir):
    images = sorted((dataset_dir / "test" / "Viral Pneumonia").iterdir())[:2] + sorted((dataset_dir / "test" / "Normal").iterdir())[:2]
    result = subprocess.run(
        [sys.executable, "-m", "covid_xray.cli", "predict", str(trained_run.run_dir / "model"), *map(str, images), "--json"],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stderr
    rows = json.loads(result.stdout)
    assert [r["path"] for r in rows] == list(map(str, images))
    assert sum(r["label"] == p.parent.name for r, p in zip(rows, images)) >= 3


def test_evaluate_prints_the_same_test_and_deduplicated_figures_as_the_run(trained_run, dataset_dir):
    result = subprocess.run(
        [sys.executable, "-m", "covid_xray.cli", "evaluate", str(trained_run.run_dir / "model"), "--data",
         str(dataset_dir), "--json"], capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stderr
    evaluated = json.loads(result.stdout)
    saved = json.loads((trained_run.run_dir / "metrics.json").read_text())
    for split in ("test", "test_dedup"):
        for key in ("n", "accuracy", "confusion_matrix"):
            assert evaluated[split][key] == saved[split][key], (split, key)
        assert evaluated[split]["ci95"]["accuracy"] == saved[split]["ci95"]["accuracy"], split
        for name, figures in saved[split]["per_class"].items():
            assert evaluated[split]["per_class"][name]["sensitivity"] == figures["sensitivity"], (split, name)
    assert evaluated["test_dedup"]["excluded"] == saved["test_dedup"]["excluded"]


def test_two_source_training_reports_each_source_and_the_size_confound(dataset_dir, second_source, tmp_path):
    """Kaggle + radiography-dev, short schedule: per-source test figures, the audit's class × size flag
    (radiography-dev's Viral Pneumonia files are 256 px, its others 224 px) and the native-size probe."""
    from covid_xray.config import TrainConfig
    from covid_xray.data import Source
    from covid_xray.training import train_run

    result = train_run(TrainConfig(epochs=3, min_epochs=1, bootstrap=50, texture_jitter=True),
                       [Source("kaggle", dataset_dir), Source("rdb", second_source)], tmp_path, log=lambda m: None)
    metrics = result.metrics
    assert set(metrics["per_source"]) == {"kaggle", "rdb"}
    assert metrics["per_source"]["kaggle"]["n"] == 66 and metrics["per_source"]["rdb"]["n"] >= 100
    assert metrics["per_source"]["rdb"]["accuracy"] >= 0.7, metrics["per_source"]["rdb"]
    flagged = result.config.data["audit"]["size_confounds"]
    assert [(c["source"], c["label"], c["size"], c["other_size"]) for c in flagged] == \
        [("rdb", "Viral Pneumonia", "256×256", "224×224")]
    swap, = metrics["size_swap"]
    assert swap["source"] == "rdb" and swap["n_class"] >= 30 and 0 <= swap["class_called_class_restored"] <= 1
    report = (tmp_path / "report.md").read_text()
    assert "## Shortcut probe: native size" in report and "## Class × native size" in report
