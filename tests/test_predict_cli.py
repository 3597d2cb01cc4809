"""`covid-xray predict` at scale: DataLoader batches, streaming CSV, --resume, error rows, JSON."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from _serving import SRC
from _images import encode, xray_like
from PIL import Image

from covid_xray import cli
from covid_xray.bulk_predict import PredictionCSV, expand_paths, iter_predictions
from covid_xray.errors import CovidXrayError
from covid_xray.inference import Predictor


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("xrays")
    (root / "sub").mkdir()
    for i in range(5):
        (root / f"img{i}.jpg").write_bytes(encode(xray_like(160, seed=i), "JPEG"))
    (root / "sub" / "deep.png").write_bytes(encode(xray_like(160, seed=9), "PNG"))
    (root / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    (root / "notes.txt").write_text("not an image, not picked up")
    return root


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.mark.parametrize("workers", [0, 2])  # in the calling thread; two decoding threads reading ahead
def test_streams_in_order_with_error_rows(untrained_bundle, folder, workers):
    predictor = Predictor.from_bundle(untrained_bundle)
    paths = expand_paths([folder])
    rows = list(iter_predictions(predictor, paths, batch_size=2, workers=workers))
    assert [r["path"] for r in rows] == [str(p) for p in paths]
    assert len(rows) == 7 and not any(r["path"].endswith(".txt") for r in rows)
    broken = next(r for r in rows if r["path"].endswith("broken.png"))
    assert "label" not in broken and broken["error"]
    good = [r for r in rows if "error" not in r]
    expected = predictor.predict([r["path"] for r in good])
    assert [r["label"] for r in good] == [e["label"] for e in expected]
    for r, e in zip(good, expected):
        assert r["probabilities"] == pytest.approx(e["probabilities"], abs=1e-5)


def test_csv_then_resume_predicts_only_the_rest(untrained_bundle, folder, tmp_path, capsys):
    out = tmp_path / "predictions.csv"
    assert cli.main(["predict", str(untrained_bundle), str(folder), "--out", str(out), "--no-progress"]) == 1
    first = read_csv(out)
    assert len(first) == 7 and list(first[0]) == ["path", "label", "Covid", "Normal", "Viral Pneumonia", "ood",
                                                  "ood_score", "atypical", "class_distance", "refer",
                                                  "refer_reasons", "error"]
    good = next(r for r in first if not r["error"])
    assert good["ood"] in ("True", "False") and float(good["ood_score"]) >= 0 and good["refer"] in ("True", "False")
    assert good["atypical"] in ("True", "False") and float(good["class_distance"]) >= 0
    assert (good["refer_reasons"] != "") == (good["refer"] == "True")
    assert sum(bool(r["error"]) for r in first) == 1

    # A run killed mid-row, and new images arrived since.
    text = out.read_text()
    out.write_text(text[: text.rindex("\n", 0, len(text) - 1) + 1] + first[-1]["path"][:5])
    (folder / "new.jpg").write_bytes(encode(xray_like(160, seed=20), "JPEG"))
    try:
        cli.main(["predict", str(untrained_bundle), str(folder), "--out", str(out), "--resume", "--no-progress"])
        assert "resuming: 6 of 8 images" in capsys.readouterr().err
        second = read_csv(out)
    finally:
        (folder / "new.jpg").unlink()
    assert sorted(r["path"] for r in second) == sorted({r["path"] for r in first} | {str(folder / "new.jpg")})
    assert second[:6] == first[:6]


def test_resume_refuses_a_csv_from_another_model(untrained_bundle, tmp_path):
    out = tmp_path / "other.csv"
    out.write_text("path,label,Cat,Dog,error\n")
    with pytest.raises(CovidXrayError, match="columns"):
        PredictionCSV(out, ["Covid", "Normal", "Viral Pneumonia"], resume=True)
    assert cli.main(["predict", str(untrained_bundle), str(out), "--resume"]) == 2  # needs --out


def test_json_and_table_output(untrained_bundle, folder, capsys):
    image = str(folder / "img0.jpg")
    assert cli.main(["predict", str(untrained_bundle), image, str(folder / "broken.png"), "--json"]) == 1
    rows = json.loads(capsys.readouterr().out)
    assert rows[0]["path"] == image and rows[0]["label"] in rows[0]["probabilities"]
    assert list(rows[0]["probabilities"]) == ["Covid", "Normal", "Viral Pneumonia"]
    assert rows[0]["ood"] is False and isinstance(rows[0]["ood_score"], float) and isinstance(rows[0]["refer"], bool)
    assert "error" in rows[1]
    assert cli.main(["predict", str(untrained_bundle), image]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].split()[:2] == ["image", "label"] and table[1].startswith(image)
    assert "NOT A CHEST X-RAY" not in table[1]


def test_table_warns_about_an_image_that_is_not_an_xray(untrained_bundle, tmp_path, capsys):
    noise = tmp_path / "noise.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (200, 200), dtype=np.uint8)).save(noise)
    assert cli.main(["predict", str(untrained_bundle), str(noise)]) == 0
    row = capsys.readouterr().out.splitlines()[1]
    assert "NOT A CHEST X-RAY? (out of distribution)" in row and "REFER" in row


def test_cli_module_imports_nothing_heavy():
    # `predict` on one image must start fast: torch, timm and the web stack load only when needed.
    code = "import sys, covid_xray.cli; print(sorted(m for m in ('torch', 'timm', 'fastapi', 'uvicorn') if m in sys.modules))"
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_predict_end_to_end_in_a_fresh_process(untrained_bundle, folder):
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    r = subprocess.run([sys.executable, "-m", "covid_xray.cli", "predict", str(untrained_bundle), str(folder / "img1.jpg"),
                        "--json"], env=env, capture_output=True, text=True, timeout=120, check=False)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)[0]["path"].endswith("img1.jpg")
