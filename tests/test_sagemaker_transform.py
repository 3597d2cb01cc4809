"""`covid-xray sagemaker transform` in local-process mode: SageMaker's batch transform emulated on this
machine, with a real bundle served as the container serves it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
from _images import encode, xray_like
from _serving import SRC, dicom_bytes

from covid_xray.errors import CovidXrayError
from covid_xray.inference import Predictor
from covid_xray.sagemaker import launcher
from covid_xray.sagemaker.jobs import TrainingJob
from covid_xray.sagemaker.transform import input_files


@pytest.fixture(scope="module")
def model_tar(untrained_bundle, tmp_path_factory) -> Path:
    """The bundle as a training job leaves it: model.tar.gz with the bundle at the archive's top level."""
    path = tmp_path_factory.mktemp("job") / "model.tar.gz"
    with tarfile.open(path, "w:gz") as tar:
        for f in sorted(untrained_bundle.iterdir()):
            tar.add(f, arcname=f.name)
    return path


@pytest.fixture
def archive(tmp_path) -> Path:
    """A hospital's folder: films in subfolders, in three formats, one file that is no image, a hidden file."""
    root = tmp_path / "archive"
    (root / "ward7").mkdir(parents=True)
    (root / "ward7" / "a.jpg").write_bytes(encode(xray_like(300, seed=1), "JPEG"))
    (root / "ward7" / "b.png").write_bytes(encode(xray_like(200, seed=2), "PNG"))
    (root / "c.dcm").write_bytes(dicom_bytes(np.asarray(xray_like(64, seed=3)).astype(np.uint16) * 200))
    (root / "notes.txt").write_text("not a film")
    (root / ".DS_Store").write_bytes(b"\0\0")
    return root


def test_local_process_transform_writes_one_out_per_file_and_reruns_only_the_rest(model_tar, untrained_bundle,
                                                                                  archive, tmp_path):
    out = tmp_path / "out"
    result = launcher.transform(str(model_tar), archive, out, concurrency=2, log=lambda m: None)
    assert sorted(result.written) == ["c.dcm", "ward7/a.jpg", "ward7/b.png"] and not result.kept
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*.out")) == [
        "c.dcm.out", "ward7/a.jpg.out", "ward7/b.png.out"]
    predictor = Predictor.from_bundle(untrained_bundle)
    for name in result.written:  # what the endpoint answers, as `covid-xray predict` says it
        answer = json.loads((out / f"{name}.out").read_text())
        expected = predictor.predict([archive / name])[0]
        assert answer["predictions"][0]["label"] == expected["label"] and answer["model"]["classes"]
    error = json.loads((out / "notes.txt.error").read_text())
    assert error["status"] == 400 and "not an image" in error["error"] and list(result.errors) == ["notes.txt"]
    assert "1 refused" in result.summary() and "notes.txt.error" in result.summary()

    (archive / "ward7" / "d.png").write_bytes(encode(xray_like(220, seed=4), "PNG"))
    again = launcher.transform(str(model_tar), archive, out, log=lambda m: None)
    assert again.written == ["ward7/d.png"] and sorted(again.kept) == ["c.dcm", "ward7/a.jpg", "ward7/b.png"]
    assert list(again.errors) == ["notes.txt"]  # refused files are sent again: the reason may have been passing

    (archive / "notes.txt").unlink()
    last = launcher.transform(str(model_tar), archive, out, log=lambda m: None)
    assert not last.written and not last.errors and len(last.kept) == 4  # nothing to send: no server started


def test_cli_transform_prints_the_summary_and_fails_on_refused_files(model_tar, archive, tmp_path):
    job_dir = tmp_path / "job"
    launcher.save_state(job_dir, job=asdict(TrainingJob("covid-xray-test", "local-process", str(model_tar))))
    cmd = [sys.executable, "-m", "covid_xray.cli", "sagemaker", "transform", "--job-dir", str(job_dir),
           "--input", str(archive), "--output", str(tmp_path / "out")]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(SRC)})
    assert result.returncode == 1, result.stderr[-2000:]
    assert "transform: 3 written, 0 kept from an earlier run, 1 refused" in result.stdout
    assert "Traceback" not in result.stderr


def test_transform_refuses_what_local_process_cannot_do(model_tar, archive, tmp_path):
    with pytest.raises(CovidXrayError, match="local-process transforms local folders, not s3://b/in"):
        launcher.transform(str(model_tar), "s3://b/in", tmp_path / "out")
    with pytest.raises(CovidXrayError, match="is not a file or folder"):
        input_files(tmp_path / "missing")
    with pytest.raises(CovidXrayError, match="--concurrency must be at least 1"):
        launcher.transform(str(model_tar), archive, tmp_path / "out", concurrency=0)
