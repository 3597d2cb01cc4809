"""SageMaker's own local mode, for real: the SDK runs the training job and the endpoint in Docker containers of the
image `make sagemaker-image` builds (docker/), with the real data and a short schedule — once for the SDK line
installed here and once for the other line's environment ($COVID_XRAY_OTHER_SDK_PYTHON; `make test` sets it to
.venv-v2's). Skipped, with the reason in the summary, where Docker or the image is missing.

Every container the SDK starts is removed at the end, also when a step fails; the endpoint is called on
localhost only."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from covid_xray.inference import Predictor
from covid_xray.sagemaker import jobs, sdk

pytestmark = pytest.mark.docker

ROOT = Path(__file__).resolve().parents[1]
OTHER_PYTHON_ENV = "COVID_XRAY_OTHER_SDK_PYTHON"
SHORT = {"epochs": 1, "image-size": 96, "batch-size": 16, "bootstrap": 100, "seed": 0}
CLASSES = ["Covid", "Normal", "Viral Pneumonia"]

# train -> deploy -> predict -> delete through the launcher, in whichever environment runs it; prints one JSON line.
WORKFLOW = """
import dataclasses, json, sys
from pathlib import Path
from covid_xray.sagemaker import launcher, sdk
data, out, hyperparameters, films = sys.argv[1], sys.argv[2], json.loads(sys.argv[3]), sys.argv[4:]
log = []
job = launcher.train(launcher.channels(data), instance_type="local", hyperparameters=hyperparameters, out=out,
                     log=log.append)
endpoint = launcher.deploy(job)
try:
    described = endpoint.describe()
    answers = [endpoint.predict(Path(film).read_bytes())["predictions"][0] for film in films]
finally:
    endpoint.delete_endpoint()
print(json.dumps({"line": sdk.sdk_line(), "job": dataclasses.asdict(job), "endpoint": described, "answers": answers,
                  "log": log}))
"""


def _containers() -> set[str]:
    """Every container of the local-mode image, running or not."""
    result = subprocess.run(["docker", "ps", "-aq", "--filter", f"ancestor={sdk.LOCAL_IMAGE}"], capture_output=True,
                            text=True, check=False, timeout=30)
    return set(result.stdout.split())


@pytest.fixture(scope="module")
def docker_ready():
    problem = jobs.docker_problem()
    if problem:
        pytest.skip(problem)
    if not jobs.docker_image_exists(sdk.LOCAL_IMAGE):
        pytest.skip(f"no image {sdk.LOCAL_IMAGE}: run 'make sagemaker-image' (root, Docker; about 4 minutes)")


def _python(which: str) -> str:
    if which == "installed":
        if sdk.sdk_line() is None:
            pytest.skip("the SageMaker SDK is not installed: pip install -e '.[sagemaker]'")
        return sys.executable
    other = os.environ.get(OTHER_PYTHON_ENV)
    if not other:
        pytest.skip(f"the other SDK line needs an interpreter in ${OTHER_PYTHON_ENV} (make test: .venv-v2/bin/python)")
    return other


@pytest.mark.parametrize("which", ["installed", "other"])
def test_local_mode_trains_serves_and_answers_as_covid_xray_predict(which, docker_ready, dataset_dir, tmp_path):
    python = _python(which)
    films = sorted((dataset_dir / "test").glob("*/*"))[::11]  # a few of each class
    before = _containers()
    try:
        result = subprocess.run(
            [python, "-c", WORKFLOW, str(dataset_dir), str(tmp_path / "job"), json.dumps(SHORT), *map(str, films)],
            capture_output=True, text=True, timeout=1500, check=False,
            env={**os.environ, "PYTHONPATH": str(ROOT / "src"), "SAGEMAKER_SUPPRESS_V2_WARNING": "1"},
        )
    finally:
        left = _containers() - before
        if left:
            subprocess.run(["docker", "rm", "-f", *left], capture_output=True, check=False, timeout=120)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert not left, f"containers left behind: {left}"
    run = json.loads(result.stdout.splitlines()[-1])
    job, answers = run["job"], run["answers"]
    assert job["sdk"] == run["line"] and f"training image: {sdk.LOCAL_IMAGE}" in run["log"]
    assert run["endpoint"]["url"] == "http://localhost:8080"
    assert 0 <= job["metrics"]["test_accuracy"] <= 1 and Path(job["output_dir"], "report.md").is_file()

    # model.tar.gz: the layout `covid-xray train` writes (its model/ folder), plus code/ for the serving container.
    with tarfile.open(job["model_data"]) as tar:
        names = set(tar.getnames())
        tar.extractall(tmp_path / "model", filter="data")
    assert {name.split("/")[0] for name in names} == {"model.safetensors", "model.onnx", "ood.safetensors",
                                                       "MODEL_CARD.md", "config.json", "code"}
    assert {"code/inference.py", "code/requirements.txt", "code/covid_xray/sagemaker/handlers.py"} <= names
    config = json.loads((tmp_path / "model" / "config.json").read_text())
    assert config["classes"] == CLASSES and config["input_size"] == SHORT["image-size"]

    # The endpoint in its container answers as `covid-xray predict` does here, on the same bundle.
    expected = Predictor.from_bundle(tmp_path / "model").predict(films)
    for film, answer, local in zip(films, answers, expected, strict=True):
        assert answer["label"] == local["label"], film
        for name, p in local["probabilities"].items():
            assert answer["probabilities"][name] == pytest.approx(p, abs=2e-3), film
