"""What every way of running the training job shares: the instance types and the checks that choose
between them, the `source_dir` the job runs from, and what a finished job leaves (`TrainingJob`, its
archives). `sdk`, `local_process` and `endpoints` build on this module; it imports nothing heavy."""

from __future__ import annotations

import os
import shutil
import subprocess
import tarfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import CovidXrayError
from . import entry

LOCAL_PROCESS = "local-process"
LOCAL_MODES = ("local", "local_gpu")
BASE_JOB_NAME = "covid-xray"

Log = Callable[[str], None]


# --- what a job is -------------------------------------------------------------------------------


@dataclass
class TrainingJob:
    """A finished training job: where its model.tar.gz is and what it reported."""

    name: str
    instance_type: str
    model_data: str  # a local path (local-process, local mode) or an s3:// URI
    output_dir: str | None = None  # reports, plots, metrics.json, when they are on this machine
    metrics: dict[str, float] = field(default_factory=dict)
    region: str | None = None
    sdk: str | None = None  # the SageMaker SDK line that ran it (v2, v3); None for local-process


def stage_source_dir(dest: str | os.PathLike) -> Path:
    """The `source_dir` SageMaker uploads: train.py at its root, the covid_xray package next to it
    (the container does not have it), and requirements.txt, which the container installs first."""
    dest = Path(dest)
    shutil.rmtree(dest, ignore_errors=True)
    dest.mkdir(parents=True)
    shutil.copyfile(entry.TRAIN_SCRIPT, dest / "train.py")
    entry.copy_package(dest)
    (dest / "requirements.txt").write_text("\n".join(entry.TRAINING_REQUIREMENTS) + "\n")
    return dest


def _extract(archive: Path, dest: Path) -> Path:
    shutil.rmtree(dest, ignore_errors=True)
    dest.mkdir(parents=True)
    with tarfile.open(archive) as tar:
        tar.extractall(dest, filter="data")  # refuses absolute paths, links out of dest, devices
    return dest


# --- environment checks: one sentence each, never an SDK traceback ----------------------------


def docker_problem() -> str | None:
    """Why SageMaker local mode cannot run here (one sentence that says what to do), or None: the docker
    command, a daemon that answers, and docker compose (v2's plugin or Debian's docker-compose)."""
    if not shutil.which("docker"):
        return ("SageMaker local mode needs Docker, which is not installed: install it (Debian: apt-get install "
                "docker.io docker-compose), or use --instance-type local-process to run the same entry point without it")
    if _quiet(["docker", "info"]) != 0:
        return ("SageMaker local mode needs a running Docker daemon, and none answers: start it (systemctl start docker, "
                "or dockerd &), or use --instance-type local-process to run the same entry point without it")
    if _quiet(["docker", "compose", "version"]) != 0 and not shutil.which("docker-compose"):
        return ("SageMaker local mode runs its containers through docker compose, which is not installed: install it "
                "(Debian: apt-get install docker-compose), or use --instance-type local-process")
    return None


def _quiet(command: list[str]) -> int:
    try:
        return subprocess.run(command, check=False, capture_output=True, timeout=20).returncode
    except (OSError, subprocess.TimeoutExpired):
        return 1


def docker_image_exists(image: str) -> bool:
    return _quiet(["docker", "image", "inspect", image]) == 0


class LocalContainers:
    """What SageMaker local mode leaves behind, removed: the containers of `image` started since this object was
    made (the SDK leaves exited training and serving containers) and its `sagemaker-local` network once unused."""

    def __init__(self, image: str):
        self.image = image
        self.before = self._ids()

    def _ids(self) -> set[str]:
        try:
            listed = subprocess.run(["docker", "ps", "-aq", "--filter", f"ancestor={self.image}"], check=False,
                                    capture_output=True, text=True, timeout=30).stdout
        except (OSError, subprocess.TimeoutExpired):
            return set()
        return set(listed.split())

    def started(self) -> set[str]:
        return self._ids() - self.before

    def remove(self) -> None:
        if new := self.started():
            _quiet(["docker", "rm", "-f", *sorted(new)])
        _quiet(["docker", "network", "rm", "sagemaker-local"])  # refused while another job uses it

    def __enter__(self) -> LocalContainers:
        return self

    def __exit__(self, *exc_info) -> None:
        self.remove()


def check_instance_type(instance_type: str, instance_count: int = 1) -> None:
    if instance_type not in (LOCAL_PROCESS, *LOCAL_MODES) and not instance_type.startswith("ml."):
        raise CovidXrayError(f"unknown instance type {instance_type!r}: use local-process, local, local_gpu or an ml.* type")
    if instance_count < 1:
        raise CovidXrayError("instance count must be at least 1")
    if instance_type == "local_gpu" and instance_count > 1:
        raise CovidXrayError("SageMaker local mode runs one GPU instance: use --instance-count 1 with local_gpu")
