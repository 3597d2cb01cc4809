"""SageMaker's own local mode, for real: the SDK runs the training job, the endpoint and a batch transform job in
Docker containers of the image `make sagemaker-image` builds (docker/), with the real data and a short schedule —
through the `covid-xray sagemaker` commands with the SDK line installed here, and through the Python launcher with
the other line's environment ($COVID_XRAY_OTHER_SDK_PYTHON; `make test` sets it to .venv-v2's). Skipped, with
the reason in the summary, where Docker or the image is missing.

Every container the SDK starts is removed at the end, also when a step fails; the endpoint is called on
localhost only."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest

from covid_xray.inference import Predictor
from covid_xray.sagemaker import jobs, sdk

pytestmark = pytest.mark.docker

ROOT = Path(__file__).resolve().parents[1]
OTHER_PYTHON_ENV = "COVID_XRAY_OTHER_SDK_PYTHON"
SHORT = {"epochs": 1, "image-size": 96, "batch-size": 16, "bootstrap": 100, "seed": 0}
CLASSES = ["Covid", "Normal", "Viral Pneumonia"]
ENV = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "SAGEMAKER_SUPPRESS_V2_WARNING": "1"}

# train -> deploy -> predict -> delete -> batch transform, through the launcher, in whichever environment runs it;
# prints one JSON line.
WORKFLOW = """
import dataclasses, json, sys
from pathlib import Path
from covid_xray.sagemaker import launcher, sdk
data, out, hyperparameters, archive, films = sys.argv[1], sys.argv[2], json.loads(sys.argv[3]), sys.argv[4], sys.argv[5:]
log = []
job = launcher.train(launcher.channels(data), instance_type="local", hyperparameters=hyperparameters, out=out,
                     log=log.append)
endpoint = launcher.deploy(job)
try:
    described = endpoint.describe()
    answers = [endpoint.predict(Path(film).read_bytes())["predictions"][0] for film in films]
finally:
    endpoint.delete_endpoint()
transform = launcher.transform(job, archive, Path(out) / "transform", log=log.append)
print(json.dumps({"line": sdk.sdk_line(), "job": dataclasses.asdict(job), "endpoint": described, "answers": answers,
                  "written": transform.written, "log": log}))
"""


@pytest.fixture(scope="module")
def docker_ready():
    problem = jobs.docker_problem()
    if problem:
        pytest.skip(problem)
    if not jobs.docker_image_exists(sdk.LOCAL_IMAGE):
        pytest.skip(f"no image {sdk.LOCAL_IMAGE}: run 'make sagemaker-image' (root, Docker; about 4 minutes)")


def _checked(command: list[str], timeout: int) -> str:
    result = subprocess.run(command, capture_output=True, text=True, timeout=timeout, check=False, env=ENV)
    assert result.returncode == 0, f"{command[1:5]}\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}"
    return result.stdout


def _through_the_cli(data: Path, job_dir: Path, archive: Path, films: list[Path]) -> tuple[dict, list[dict], str]:
    """What a user types: train, deploy (serving in the foreground), predict and transform from another terminal,
    cleanup (which stops the deploy command). Returns (the job, the answers, the training log)."""
    cli = [sys.executable, "-m", "covid_xray.cli", "sagemaker"]
    hyperparameters = [arg for name, value in SHORT.items() for arg in (f"--{name}", str(value))]
    log = _checked([*cli, "train", "--instance-type", "local", "--data", str(data), "--job-dir", str(job_dir),
                    *hyperparameters], timeout=1200)
    deploy_log = job_dir / "deploy.log"  # a file, not a pipe: the SDK streams the container's log into it
    with open(deploy_log, "w") as sink:
        deploy = subprocess.Popen([*cli, "deploy", "--job-dir", str(job_dir)], stdout=sink, stderr=subprocess.STDOUT,
                                  env=ENV)
    try:
        deadline = time.monotonic() + 600
        while "serving until Ctrl-C" not in deploy_log.read_text():  # the endpoint answers /ping by then
            if deploy.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"deploy did not start serving: {deploy_log.read_text()[-3000:]}")
            time.sleep(1)
        predicted = json.loads(_checked([*cli, "predict", "--job-dir", str(job_dir), *map(str, films), "--json"], 300))
        _checked([*cli, "transform", "--job-dir", str(job_dir), "--input", str(archive), "--output",
                  str(job_dir / "transform")], timeout=600)
        assert "endpoint deleted" in _checked([*cli, "cleanup", "--job-dir", str(job_dir)], timeout=300)
        assert deploy.wait(timeout=60) == 130  # stopped by cleanup, as by Ctrl-C, after deleting the endpoint
    finally:
        if deploy.poll() is None:
            deploy.terminate()
            deploy.wait(timeout=120)
    state = json.loads((job_dir / "sagemaker.json").read_text())
    assert state["endpoint"] is None
    answers = [{k: v for k, v in row.items() if k != "path"} for row in predicted]
    return state["job"], answers, log


def _through_the_launcher(python: str, data: Path, job_dir: Path, archive: Path,
                          films: list[Path]) -> tuple[dict, list[dict], str]:
    out = _checked([python, "-c", WORKFLOW, str(data), str(job_dir), json.dumps(SHORT), str(archive),
                    *map(str, films)], timeout=1500)
    run = json.loads(out.splitlines()[-1])
    assert run["job"]["sdk"] == run["line"] and run["endpoint"]["url"] == "http://localhost:8080"
    assert run["written"] == ["a.jpeg", "ward7/b.jpeg"]
    return run["job"], run["answers"], "\n".join(run["log"])


@pytest.mark.parametrize("which", ["cli", "other-sdk-line"])
def test_local_mode_trains_serves_and_answers_as_covid_xray_predict(which, docker_ready, dataset_dir, trained_run,
                                                                   tmp_path):
    if which == "cli" and sdk.sdk_line() is None:
        pytest.skip("the SageMaker SDK is not installed: pip install -e '.[sagemaker]'")
    other = os.environ.get(OTHER_PYTHON_ENV)
    if which == "other-sdk-line" and not other:
        pytest.skip(f"the other SDK line needs an interpreter in ${OTHER_PYTHON_ENV} (make test: .venv-v2/bin/python)")
    films = sorted((dataset_dir / "test").glob("*/*"))[::11]  # a few of each class
    archive = tmp_path / "archive"  # for the transform job: files at the top and in a subfolder
    (archive / "ward7").mkdir(parents=True)
    shutil.copy(films[0], archive / "a.jpeg")
    shutil.copy(films[-1], archive / "ward7" / "b.jpeg")
    job_dir = tmp_path / "job"
    containers = jobs.LocalContainers(sdk.LOCAL_IMAGE)
    try:
        if which == "cli":
            job, answers, log = _through_the_cli(dataset_dir, job_dir, archive, films)
        else:
            job, answers, log = _through_the_launcher(other, dataset_dir, job_dir, archive, films)
    finally:
        left = containers.started()  # the launcher removes them; this is for when a step failed
        containers.remove()
    assert not left, f"containers left behind: {left}"
    assert f"training image: {sdk.LOCAL_IMAGE}" in log
    assert 0 <= job["metrics"]["test_accuracy"] <= 1 and Path(job["output_dir"], "report.md").is_file()

    # model.tar.gz: the files `covid-xray train` writes (its model/ folder), plus code/ for the serving container.
    with tarfile.open(job["model_data"]) as tar:
        names = set(tar.getnames())
        tar.extractall(tmp_path / "model", filter="data")
    bundle = {p.name for p in (trained_run.run_dir / "model").iterdir()}
    assert {name.split("/")[0] for name in names} == bundle | {"code"}
    assert {"code/inference.py", "code/requirements.txt", "code/covid_xray/sagemaker/handlers.py"} <= names
    config = json.loads((tmp_path / "model" / "config.json").read_text())
    assert config["classes"] == CLASSES and config["input_size"] == SHORT["image-size"]

    # The endpoint in its container answers as `covid-xray predict` does here, on the same bundle.
    expected = Predictor.from_bundle(tmp_path / "model").predict(films)
    for film, answer, local in zip(films, answers, expected, strict=True):
        assert answer["label"] == local["label"], film
        for name, p in local["probabilities"].items():
            assert answer["probabilities"][name] == pytest.approx(p, abs=2e-3), film

    # SageMaker's own local transform job: each FILE.out, at the input's relative path, holds the container's answer.
    for name, answer in (("a.jpeg", answers[0]), ("ward7/b.jpeg", answers[-1])):
        out = json.loads((job_dir / "transform" / (name + ".out")).read_text())["predictions"][0]
        assert out["label"] == answer["label"], name
        assert out["probabilities"] == pytest.approx(answer["probabilities"], abs=1e-6), name
