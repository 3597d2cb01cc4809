"""Several data sources: naming, each source split on its own, a held-out source tested on all its images,
per-source metrics of a real (tiny) training run, and the class × source audit."""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import pytest
from _images import make_class_tree

from covid_xray import cli
from covid_xray.audit import audit_dataset
from covid_xray.bundle import read_config
from covid_xray.data import Sample, discover, fingerprint, parse_sources
from covid_xray.errors import DataError, ModelError
from covid_xray.evaluation import trained_dataset
from covid_xray.sagemaker.entry import SageMakerEnv


def _paths(samples: list[Sample]) -> list[Path]:
    return [s.path for s in samples]


@pytest.fixture(scope="module")
def two(tmp_path_factory) -> tuple[Path, Path]:
    """Two sources of the same three classes, different images: a Kaggle layout and a class-folder tree."""
    root = tmp_path_factory.mktemp("sources")
    make_class_tree(root / "hospital/train", per_class=10)
    make_class_tree(root / "hospital/test", per_class=3, seed=50)
    return root / "hospital", make_class_tree(root / "clinic", per_class=8, seed=1000)


def test_sources_are_named_explicitly_or_after_their_folder(tmp_path, two):
    hospital, clinic = two
    sources = parse_sources([f"north={hospital}", str(clinic)])
    assert [(s.name, s.path) for s in sources] == [("north", hospital), ("clinic", clinic)]
    a, b = make_class_tree(tmp_path / "a/data"), make_class_tree(tmp_path / "b/data", seed=1000)
    assert [s.name for s in parse_sources([str(a), str(b), f"data-2={clinic}"])] == ["data", "data-3", "data-2"]
    with pytest.raises(DataError, match="source names must differ: x, x"):
        parse_sources([f"x={a}", f"x={b}"])
    with pytest.raises(DataError, match="dataset not found at /nowhere"):
        parse_sources(["y=/nowhere"])


def test_samples_carry_their_source_and_each_source_is_split_on_its_own(tmp_path, two):
    hospital, clinic = two
    images = make_class_tree(tmp_path / "south/images", per_class=8, seed=2000)
    manifest = tmp_path / "south/labels.csv"
    manifest.write_text("path,label\n" + "".join(f"{p.relative_to(manifest.parent)},{p.parent.name}\n"
                                                 for p in sorted(images.rglob("*.png"))))
    ds = discover(parse_sources([f"north={hospital}", str(clinic), str(manifest)]))
    assert ds.classes == ["A", "B", "C"] and [s.name for s in ds.sources] == ["north", "clinic", "labels"]
    assert [(s.layout, s.carved) for s in ds.sources] == [
        ("kaggle", ("val",)), ("folders", ("test", "val")), ("csv", ("test", "val"))]
    assert ds.layout == "kaggle+folders+csv" and ds.root == Path(os.path.commonpath([hospital, clinic, tmp_path]))
    for name, path in (("north", hospital), ("clinic", clinic), ("labels", manifest)):
        alone = discover(path)
        for split in ("train", "val", "test"):
            assert _paths([s for s in ds[split] if s.source == name]) == _paths(alone[split])
    assert {s.source for split in ds.splits.values() for s in split} == {"north", "clinic", "labels"}


def test_one_source_splits_as_before(tmp_path, two):
    _, clinic = two
    plain, named = discover(clinic, split_seed=3), discover(parse_sources([str(clinic)]), split_seed=3)
    assert plain.splits == named.splits and plain.root == named.root == clinic and plain.layout == "folders"
    assert {s.source for split in plain.splits.values() for s in split} == {"clinic"}
    plain.write_splits_csv(tmp_path / "splits.csv")
    rows = list(csv.DictReader(open(tmp_path / "splits.csv")))
    assert list(rows[0]) == ["path", "label", "split", "source"] and rows[0]["path"].startswith(("A/", "B/", "C/"))
    # One source's name is not part of the fingerprint: renaming the folder keeps it.
    digests = {"train": ["d1", "d2"]}
    as_named = {"train": [Sample(Path("x"), 0, "clinic"), Sample(Path("y"), 1, "clinic")]}
    renamed = {"train": [Sample(Path("x"), 0, "elsewhere"), Sample(Path("y"), 1, "elsewhere")]}
    assert fingerprint(digests, ["A", "B"], as_named) == fingerprint(digests, ["A", "B"], renamed)
    mixed = {"train": [Sample(Path("x"), 0, "clinic"), Sample(Path("y"), 1, "elsewhere")]}
    assert fingerprint(digests, ["A", "B"], mixed) != fingerprint(digests, ["A", "B"], as_named)


def test_class_names_spelt_differently_in_another_source_are_refused(tmp_path, two):
    hospital, _ = two
    other = make_class_tree(tmp_path / "other", classes=("a", "B", "Viral_C"), seed=1000)
    with pytest.raises(DataError, match=r"source 'other' has classes B, Viral_C, a: 'a' looks like 'A'"):
        discover(parse_sources([str(hospital), str(other)]))


def test_held_out_source_is_all_test_and_never_trained_on(two):
    hospital, clinic = two
    sources = parse_sources([f"north={hospital}", str(clinic)])
    ds = discover(sources, holdout="clinic")
    assert ds.holdout == "clinic"
    assert not [s for s in ds["train"] + ds["val"] if s.source == "clinic"]
    assert sorted(_paths([s for s in ds["test"] if s.source == "clinic"])) == sorted(clinic.rglob("*.png"))
    mixed = discover(sources)  # the training source splits exactly as without a held-out source
    for split in ("train", "val", "test"):
        assert _paths([s for s in ds[split] if s.source == "north"]) == _paths([s for s in mixed[split] if s.source == "north"])


def test_held_out_source_errors(tmp_path, two):
    hospital, clinic = two
    sources = parse_sources([f"north={hospital}", str(clinic)])
    with pytest.raises(DataError, match="unknown --holdout-source 'south': the sources are north, clinic"):
        discover(sources, holdout="south")
    with pytest.raises(DataError, match="'clinic' is the only source"):
        discover(clinic, holdout="clinic")
    extra = make_class_tree(tmp_path / "extra", classes=("A", "D"), seed=2000)
    with pytest.raises(DataError, match="held-out source 'extra' has classes A, D, but no training source has D"):
        discover(parse_sources([str(clinic), str(extra)]), holdout="extra")


@pytest.fixture(scope="module")
def holdout_run(two, tmp_path_factory) -> tuple[Path, list[str], Path]:
    """`covid-xray train` on two sources holding out a third that has one class only."""
    hospital, clinic = two
    child = make_class_tree(tmp_path_factory.mktemp("child") / "kids", classes=("A",), per_class=6, seed=3000)
    data = [f"north={hospital}", str(clinic), str(child)]
    out = tmp_path_factory.mktemp("runs") / "run"
    args = ["train", *(a for d in data for a in ("--data", d)), "--holdout-source", "kids", "--out", str(out),
            "--weights", "none", "--image-size", "64", "--batch-size", "8", "--epochs", "1", "--no-onnx"]
    assert cli.main(args) == 0
    return out, data, child


@pytest.mark.integration
def test_held_out_run_reports_that_source_as_test_and_the_others_per_source(holdout_run):
    out, _, _ = holdout_run
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["test"]["n"] == 6  # every image of the held-out source
    config = json.loads((out / "model/config.json").read_text())
    counts = {name: source["counts"] for name, source in config["data"]["sources"].items()}
    assert counts["kids"] == {"train": 0, "val": 0, "test": 6} and counts["north"]["test"] == 9  # north's given test split
    assert metrics["test_in_sources"]["n"] == counts["north"]["test"] + counts["clinic"]["test"]
    assert list(metrics["per_source"]) == ["kids", "north", "clinic"]
    assert metrics["per_source"]["kids"]["accuracy"] == metrics["test"]["accuracy"]
    kids = metrics["per_source"]["kids"]  # one class present: AUC undefined, reported as null
    assert kids["macro_auc"] is None and kids["per_class"]["B"]["sensitivity"] is None
    assert set(metrics["per_source"]["north"]) >= {"accuracy", "n", "per_class", "macro_auc", "ci95"}
    assert config["hyperparameters"]["holdout_source"] == "kids" and config["data"]["holdout_source"] == "kids"
    assert config["data"]["audit"]["class_by_source"]["table"]["kids"] == {"A": 6, "B": 0, "C": 0}
    report = (out / "report.md").read_text()
    for text in ("## Test results: held-out source `kids`", "## Test results on the training sources' own test split",
                 "## Per-source results", "| kids (held out) | 6 |", "### Class × source", "- sources (each split"):
        assert text in report, text
    rows = list(csv.DictReader(open(out / "splits.csv")))
    assert {r["split"] for r in rows if r["source"] == "kids"} == {"test"}


@pytest.mark.integration
def test_evaluate_rebuilds_the_held_out_split_and_reports_per_source(holdout_run, capsys):
    out, data, child = holdout_run
    config = read_config(out / "model")
    dataset = trained_dataset(config, data)
    assert sorted(_paths([s for s in dataset["test"] if s.source == "kids"])) == sorted(child.rglob("*.png"))
    with pytest.raises(ModelError, match="trained on sources north, clinic, kids"):
        trained_dataset(config, data[:2])
    capsys.readouterr()
    assert cli.main(["evaluate", str(out / "model"), *(a for d in data for a in ("--data", d)), "--json",
                     "--bootstrap", "20"]) == 0
    evaluated = json.loads(capsys.readouterr().out)
    saved = json.loads((out / "metrics.json").read_text())
    assert evaluated["per_source"]["kids"]["accuracy"] == saved["test"]["accuracy"]
    assert evaluated["test"]["n"] + evaluated["test_in_sources"]["n"] == saved["test"]["n"] + saved["test_in_sources"]["n"]


@pytest.mark.parametrize(
    "second, verdict, gap",
    [
        ({"classes": ("B", "C")}, "strong", {"A": "one"}),  # class A comes from the first source only
        ({"classes": ("A",)}, "strong", {"B": "one", "C": "one"}),  # the second source holds one class
        ({"per_class": 8}, "none", {}),  # the same class mix in both
    ],
)
def test_audit_sees_class_confounded_with_source(tmp_path, capsys, second, verdict, gap):
    one = make_class_tree(tmp_path / "one", per_class=8)
    other = make_class_tree(tmp_path / "other", seed=1000, **{"per_class": 8, **second})
    report = audit_dataset(discover(parse_sources([str(one), str(other)])), probe=False)
    mix = report.source_mix
    assert mix.verdict == verdict and mix.single_source_classes == gap
    assert mix.single_class_sources == ({"other": "A"} if second.get("classes") == ("A",) else {})
    assert mix.table["one"] == {"A": 8, "B": 8, "C": 8}
    text = report.to_markdown()
    assert "## Class × source" in text and "| one | 8 | 8 | 8 | 24 |" in text
    assert ("A model can learn to recognise the source" in text) == (verdict != "none")
    if verdict == "none":
        assert mix.cramers_v == pytest.approx(0) and "spread alike" in text
    else:
        assert mix.cramers_v > 0.4
    assert cli.main(["audit", str(one), "--data", str(other), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["class_by_source"]["verdict"] == verdict


def test_audit_of_one_source_has_no_class_by_source(two):
    report = audit_dataset(discover(two[1]), probe=False)
    assert report.source_mix is None and report.to_dict()["class_by_source"] is None
    assert "Class × source" not in report.to_markdown()


def test_sagemaker_channels_beyond_train_and_test_are_sources():
    env = SageMakerEnv.from_environ({"SM_CHANNELS": '["hospital", "test", "train"]', "SM_CHANNEL_TRAIN": "/t",
                                     "SM_CHANNEL_TEST": "/s", "SM_CHANNEL_HOSPITAL": "/h"})
    assert env.train == "/t" and env.test == "/s" and env.sources == {"hospital": "/h"}


@pytest.mark.integration
def test_training_reports_another_sites_films_next_to_the_test_split(two, tmp_path):
    """`train --external NAME=DIR`: every film of a site it never trains on, in metrics.json, the report and
    the model card; the bundle records what validation predicts for a site (check-site's reference)."""
    hospital, _ = two
    site = make_class_tree(tmp_path / "site", classes=("A", "B"), per_class=5, seed=5000)
    out = tmp_path / "run"
    assert cli.main(["train", "--data", str(hospital), "--external", f"elsewhere={site}", "--out", str(out),
                     "--weights", "none", "--image-size", "64", "--batch-size", "8", "--epochs", "1", "--no-onnx",
                     "--texture-jitter", "--bootstrap", "20"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["external"]["n"] == 10 and metrics["external"]["source"] == "elsewhere"
    assert set(metrics["referral"]["external"]) >= {"referred_rate", "confidently_wrong_rate"}
    assert "external" in metrics["calibration"]["ece"] and "external" in metrics["ood"]["class_distance_flagged_rate"]
    config = json.loads((out / "model/config.json").read_text())
    assert config["metrics"]["external"]["n"] == 10 and config["hyperparameters"]["texture_jitter"] is True
    reference = config["site_reference"]
    assert reference["n"] == metrics["val"]["n"] == len(reference["scores"]) and 0 <= reference["referred"] <= reference["n"]
    assert sum(reference["class_mix"].values()) == pytest.approx(1, abs=1e-3)
    for text in ((out / "report.md").read_text(), (out / "model/MODEL_CARD.md").read_text()):
        assert "Another site: every film of `elsewhere`" in text and "confidently wrong" in text
