"""Dataset audit: planted duplicates and leaks are found, the metadata probe sees a planted shortcut and
reports chance without one, the masked probe tells border cues from lung-field cues, training reports
metrics with and without leaked test images, and the known copies in the Kaggle dataset are listed."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from _images import xray_like
from PIL import Image, ImageEnhance

from covid_xray.audit import audit_dataset
from covid_xray.data import discover
from covid_xray.duplicates import leaked_test_paths
from covid_xray.evaluation import lung_field_mask, masked_probe
from covid_xray.report import masked_explanation


def _tree(root: Path, split: str, per_class: int, first_seed: int, size: int = 72) -> None:
    for ci, c in enumerate(("A", "B")):
        (root / split / c).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            xray_like(size, seed=first_seed + ci * 1000 + i).save(root / split / c / f"{c}{i}.png")


@pytest.fixture(scope="module")
def planted(tmp_path_factory) -> Path:
    """Kaggle layout with one exact and one near copy of training images in test, an exact duplicate
    within train, the same image under both labels, and a file that is not an image."""
    root = tmp_path_factory.mktemp("planted") / "data"
    _tree(root, "train", 10, first_seed=0)
    _tree(root, "test", 4, first_seed=500)
    shutil.copy(root / "train/A/A0.png", root / "test/A/exact_copy.png")
    near = ImageEnhance.Brightness(Image.open(root / "train/B/B1.png").resize((96, 96))).enhance(1.1)
    near.save(root / "test/B/near_copy.jpg", quality=80)  # re-encoded, resized, brighter: different bytes
    shutil.copy(root / "train/A/A2.png", root / "train/A/A2_again.png")
    shutil.copy(root / "train/A/A3.png", root / "train/B/mislabelled.png")
    (root / "train/B/notes.png").write_text("not an image")
    return root


@pytest.fixture(scope="module")
def planted_report(planted):
    return audit_dataset(discover(planted))


def _rel(report, files) -> set[str]:
    return {report.rel(f.path) for f in files}


def test_exact_duplicates_within_and_across_splits(planted_report):
    groups = [_rel(planted_report, g) for g in planted_report.exact_groups]
    assert {"train/A/A0.png", "test/A/exact_copy.png"} in groups
    assert {"train/A/A2.png", "train/A/A2_again.png"} in groups
    assert {"train/A/A3.png", "train/B/mislabelled.png"} in groups
    assert len(groups) == 3


def test_near_duplicate_found_and_distinct_images_are_not(planted_report):
    pairs = [(_rel(planted_report, [p.a, p.b]), p.distance) for p in planted_report.near_pairs]
    assert pairs and all(files == {"train/B/B1.png", "test/B/near_copy.jpg"} for files, _ in pairs), pairs
    assert 0 < pairs[0][1] <= planted_report.near_threshold


def test_leaked_test_images_label_conflicts_and_unreadable_files(planted, planted_report):
    assert leaked_test_paths(planted_report) == {planted / "test/A/exact_copy.png", planted / "test/B/near_copy.jpg"}
    assert {x.kind for x in planted_report.leaks} == {"exact", "near"}
    assert [_rel(planted_report, g) for g in planted_report.label_conflicts] == [{"train/A/A3.png", "train/B/mislabelled.png"}]
    assert [planted_report.rel(f.path) for f in planted_report.unreadable] == ["train/B/notes.png"]
    assert "not an image" in planted_report.unreadable[0].error


def test_near_threshold_is_configurable(planted):
    assert audit_dataset(discover(planted), near_threshold=0, probe=False).near_pairs == []


def test_report_json_and_markdown(planted_report):
    d = json.loads(json.dumps(planted_report.to_dict()))
    assert {x["path"] for x in d["leaked_test"]} == {"test/A/exact_copy.png", "test/B/near_copy.jpg"}
    assert d["per_class"]["B"]["formats"] == {"PNG": 15, "JPEG": 1}
    assert d["per_class"]["B"]["sizes"] == {"72x72": 15, "96x96": 1}
    text = planted_report.to_markdown()
    assert "test images that are copies of training/validation images: 2** (1 exact, 1 near)" in text
    assert "| test/B/near_copy.jpg | train/B/B1.png | near |" in text


def _probe_tree(root: Path, sizes: dict[str, int], per_class: int = 15) -> Path:
    """Classes drawn from the same image generator; only the stored size may differ between them."""
    for ci, (c, size) in enumerate(sizes.items()):
        (root / c).mkdir(parents=True)
        for i in range(per_class):
            xray_like(size, seed=ci * 1000 + i).save(root / c / f"{i}.png")
    return root


def test_metadata_probe_detects_a_size_shortcut(tmp_path):
    report = audit_dataset(discover(_probe_tree(tmp_path, {"A": 64, "B": 80, "C": 96})))
    probe = report.probe
    assert probe.verdict == "strong" and probe.accuracy >= 0.9 and probe.storage_accuracy >= 0.9
    assert probe.majority_rate == pytest.approx(1 / 3)
    assert "far above chance" in report.to_markdown()


def test_metadata_probe_reports_chance_without_a_shortcut(tmp_path):
    report = audit_dataset(discover(_probe_tree(tmp_path, {"A": 72, "B": 72, "C": 72})))
    probe = report.probe
    assert probe.verdict == "none", probe
    assert probe.accuracy < probe.majority_rate + 0.2
    assert "At chance level" in report.to_markdown()


def test_audit_flags_a_native_size_only_one_class_has(tmp_path):
    """radiography-dev's layout: Viral Pneumonia files 256², the others 224² — in one source."""
    report = audit_dataset(discover(_probe_tree(tmp_path, {"A": 64, "B": 64, "C": 80})), probe=False)
    assert [(c.label, c.size, c.share, c.others) for c in report.size_confounds] == [("C", "80×80", 1.0, 0.0)]
    assert report.to_dict()["size_confounds"][0]["label"] == "C"
    text = report.to_markdown()
    assert "## Class × native size" in text and "can tell the class" in text and "native-size probe" in text


def test_audit_flags_no_size_when_every_class_shares_it(tmp_path):
    report = audit_dataset(discover(_probe_tree(tmp_path, {"A": 72, "B": 72, "C": 72})), probe=False)
    assert report.size_confounds == [] and "native size" not in report.to_markdown()


def test_masked_probe_tells_border_cues_from_lung_cues():
    rng = np.random.default_rng(0)
    labels = np.arange(40) % 2
    inside = lung_field_mask(64)
    images = rng.integers(60, 200, (40, 64, 64)).astype(np.uint8)
    images[:, ~inside] = np.where(labels[:, None] == 1, 250, 10).astype(np.uint8)  # class written in the border
    images[:, inside] = np.where(labels[:, None] == 1, 180, 80).astype(np.uint8)  # ... and in the lung field

    def from_region(region):
        def predict(x):
            p1 = (x[:, region].mean(axis=1) > 130).astype(float)
            return np.stack([1 - p1, p1], axis=1)
        return predict

    border = masked_probe(from_region(~inside), images, labels.tolist())
    assert border["full"] == border["centre_hidden"] == 1.0 and border["majority_rate"] == 0.5
    assert "corners with text markers" in masked_explanation(border)
    lungs = masked_probe(from_region(inside), images, labels.tolist())
    assert lungs["full"] == lungs["centre_only"] == 1.0 and lungs["centre_hidden"] == 0.5
    assert "mainly uses the lungs" in masked_explanation(lungs)


def _cli(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "covid_xray.cli", *map(str, args)], capture_output=True, text=True, timeout=300)


def test_audit_command(planted, tmp_path):
    result = _cli("audit", planted, "--json")
    assert result.returncode == 0, result.stderr
    assert len(json.loads(result.stdout)["leaked_test"]) == 2
    text = _cli("audit", planted, "--near-threshold", "0")
    assert text.returncode == 0 and "# Dataset audit" in text.stdout and "(1 exact, 0 near)" in text.stdout
    missing = _cli("audit", tmp_path / "missing")
    assert missing.returncode == 2 and missing.stderr.count("\n") == 1 and "dataset not found" in missing.stderr


@pytest.mark.integration
def test_training_and_evaluate_report_metrics_with_and_without_leaked_images(planted, tmp_path):
    from covid_xray.config import TrainConfig
    from covid_xray.training import train_run

    data = tmp_path / "data"
    shutil.copytree(planted, data)
    (data / "train/B/notes.png").unlink()
    (data / "train/B/mislabelled.png").unlink()
    logged: list[str] = []
    cfg = TrainConfig(weights="none", image_size=64, batch_size=8, epochs=1, bootstrap=20)
    result = train_run(cfg, data, tmp_path / "run", log=logged.append)
    assert any(line.startswith("warning: 2 test images are exact or near copies") for line in logged)
    assert any(line.startswith("test_dedup_accuracy=") for line in logged)
    metrics = json.loads((tmp_path / "run/metrics.json").read_text())
    assert metrics["test"]["n"] == 10 and metrics["test_dedup"]["n"] == 8
    assert metrics["test_dedup"]["excluded"] == ["test/A/exact_copy.png", "test/B/near_copy.jpg"]
    assert set(metrics["test_masked"]) == {"full", "centre_hidden", "centre_only", "majority_rate", "n"}
    report = result.report.read_text()
    for heading in ("## Test results without leaked images", "## Shortcut probe: masked lung field", "## Dataset audit",
                    "### Shortcut probe: metadata only"):
        assert heading in report
    assert json.loads((tmp_path / "run/audit.json").read_text())["leaked_test"]

    evaluated = _cli("evaluate", tmp_path / "run/model", "--data", data, "--json", "--bootstrap", "20")
    assert evaluated.returncode == 0, evaluated.stderr
    dedup = json.loads(evaluated.stdout)["test_dedup"]
    assert dedup["n"] == 8 and dedup["accuracy"] == metrics["test_dedup"]["accuracy"]
    assert dedup["excluded"] == metrics["test_dedup"]["excluded"]
    table = _cli("evaluate", tmp_path / "run/model", "--data", data, "--bootstrap", "20").stdout
    assert "without the 2 test images that are copies of training/validation images" in table


KAGGLE_EXACT_COPIES = ["COVID-00003b.jpg", "COVID-00012.jpg", "COVID-00022.jpg", "COVID-00033.jpg", "COVID-00037.jpg",
                       "radiopaedia-2019-novel-coronavirus-infected-pneumonia.jpg"]


def test_kaggle_dataset_exact_and_near_copies_in_test(dataset_dir):
    report = audit_dataset(discover(dataset_dir))
    exact = {report.rel(x.path) for x in report.leaks if x.kind == "exact"}
    assert exact == {f"test/Covid/{name}" for name in KAGGLE_EXACT_COPIES}
    near = {report.rel(x.path) for x in report.leaks if x.kind == "near"}
    assert {"test/Covid/0100.jpeg", "test/Covid/0112.jpg"} <= near
    assert all(report.rel(p).startswith("test/Covid/") for p in leaked_test_paths(report))
    assert not report.unreadable and not report.label_conflicts
    # The SARS figures filed as Covid (known_labels), all in train/Covid.
    assert sorted(report.rel(f.path) for f, _ in report.known_mislabelled) == \
        sorted(f"train/Covid/0{n}.{'jpg' if n == 56 else 'jpeg'}" for n in range(40, 60))
