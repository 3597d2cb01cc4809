"""Train, deploy, predict, batch-transform and clean up — on managed SageMaker, in SageMaker local mode, or with
no Docker and no AWS account at all.

Instance types:
- `ml.*`: managed SageMaker (AWS credentials and an execution role needed).
- `local`, `local_gpu`: SageMaker local mode, AWS's containers under Docker.
- `local-process` (the default when Docker is missing): the same entry point in subprocesses with
  the environment variables and `/opt/ml`-style layout the container would give it, the model
  tarred like SageMaker does, then served by `covid-xray serve` on a free loopback port.

The SageMaker Python SDK is imported only for `local`, `local_gpu` and `ml.*`, so
`local-process` needs neither the SDK nor Docker.

This module is the workflow that the CLI and the demo notebook call. The SDK objects are in `sdk`,
the local-process emulation in `local_process`, the endpoints in `endpoints`, and what they all
share (instance types, `TrainingJob`, `source_dir`) in `jobs`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import asdict
from pathlib import Path
from typing import Any

from ..errors import CovidXrayError
from . import entry
from . import sdk as sdk_workflow
from .endpoints import Endpoint, LocalProcessEndpoint, SageMakerEndpoint, endpoint_from_state
from .jobs import LOCAL_MODES, LOCAL_PROCESS, Log, TrainingJob, check_instance_type
from .local_process import run_local_process
from .transform import DEFAULT_CONCURRENCY, TransformResult, answered_by_job, run_local_process as transform_local_process

STATE_FILE = "sagemaker.json"


# --- the job record, for the commands that come after ------------------------------------------


def save_state(job_dir: str | os.PathLike, **entries: Any) -> Path:
    """Record the job and the endpoint in job_dir/sagemaker.json for later `deploy`, `predict`
    and `cleanup` commands (each a separate process)."""
    path = Path(job_dir) / STATE_FILE
    state = load_state(job_dir) if path.is_file() else {}
    state.update(entries)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(state, indent=2))
    return path


def load_state(job_dir: str | os.PathLike) -> dict[str, Any]:
    path = Path(job_dir) / STATE_FILE
    if not path.is_file():
        raise CovidXrayError(
            f"no SageMaker job recorded in {job_dir}: run 'covid-xray sagemaker train --job-dir {job_dir}' first"
        )
    return json.loads(path.read_text())


# --- train -------------------------------------------------------------------------------------


def default_instance_type(log: Log | None = None) -> str:
    """`local` where SageMaker local mode can run as it is (an SDK, Docker, an image), else `local-process`;
    `log` hears which one and why."""
    problem = sdk_workflow.local_mode_problem()
    if log is not None:
        log(f"instance type local-process: {problem}" if problem else
            "instance type local: SageMaker local mode, in Docker containers through docker compose")
    return LOCAL_PROCESS if problem else "local"


def channels(data: str | os.PathLike) -> dict[str, str]:
    """A dataset folder as SageMaker channels: a Kaggle layout (DIR/train, DIR/test) becomes the
    train and test channels, anything else (or an s3:// prefix) the train channel."""
    if str(data).startswith("s3://"):
        return {"train": str(data)}
    root = Path(data).expanduser().resolve()
    if not root.exists():
        raise CovidXrayError(f"dataset not found at {root}")
    if (root / "train").is_dir() and (root / "test").is_dir():
        return {"train": str(root / "train"), "test": str(root / "test")}
    return {"train": str(root)}


def train(
    inputs: Mapping[str, str | os.PathLike] | str | os.PathLike,
    *,
    instance_type: str | None = None,
    instance_count: int = 1,
    hyperparameters: Mapping[str, Any] | None = None,
    out: str | os.PathLike = "runs/sagemaker",
    role: str | None = None,
    region: str | None = None,
    sdk: str | None = None,
    image: str | None = None,
    log: Log = print,
) -> TrainingJob:
    """Run the training job. `inputs` is a dataset folder (see `channels`) or a channel → path/URI
    mapping. Everything local (source, model, reports, the job record) goes under `out`. `sdk` ('v2', 'v3')
    names the SageMaker SDK line for local mode and ml.* (default: the installed one); `image` the container
    image (default: AWS's PyTorch image, or for local mode the one `make sagemaker-image` builds, see sdk)."""
    instance_type = instance_type or default_instance_type(log)
    check_instance_type(instance_type, instance_count)
    named = inputs if isinstance(inputs, Mapping) else channels(inputs)
    inputs = {name: str(value) for name, value in named.items()}
    if "train" not in inputs:
        raise CovidXrayError("no 'train' channel: pass the training data")
    hyperparameters = dict(hyperparameters or {})
    entry.check_hyperparameters(hyperparameters)
    out = Path(out).resolve()
    if instance_type == LOCAL_PROCESS:
        job = run_local_process(inputs, hyperparameters, out=out, instance_count=instance_count, log=log)
    else:
        job = sdk_workflow.run_training(inputs, hyperparameters, instance_type, instance_count, out, role, region,
                                        log, line=sdk, image=image)
    save_state(out, job=asdict(job), endpoint=None)
    return job


# --- deploy, predict, clean up -------------------------------------------------------------------


def deploy(
    job: TrainingJob | str | os.PathLike,
    *,
    instance_type: str | None = None,
    workdir: str | os.PathLike | None = None,
    role: str | None = None,
    region: str | None = None,
    port: int | None = None,
    sdk: str | None = None,
    image: str | None = None,
) -> LocalProcessEndpoint | SageMakerEndpoint:
    """Serve a job's model.tar.gz (or one given by path/URI). The endpoint type defaults to the
    job's instance type (local-process for a bare path)."""
    model_data, instance_type, region = _model_of(job, instance_type, region)
    if instance_type == LOCAL_PROCESS:
        workdir = Path(workdir or Path(model_data).resolve().parent / "endpoint")
        workdir.mkdir(parents=True, exist_ok=True)
        return LocalProcessEndpoint.start(model_data, workdir, port=port)
    return sdk_workflow.deploy(model_data, instance_type, role=role, region=region, line=sdk, image=image)


def transform(
    job: TrainingJob | str | os.PathLike,
    source: str | os.PathLike,
    output: str | os.PathLike,
    *,
    instance_type: str | None = None,
    concurrency: int = DEFAULT_CONCURRENCY,
    role: str | None = None,
    region: str | None = None,
    sdk: str | None = None,
    image: str | None = None,
    log: Log = print,
) -> TransformResult:
    """Batch transform: every file under `source` through the job's model, FILE.out under `output`
    (`transform` module). The instance type defaults to the job's (local-process for a bare path)."""
    model_data, instance_type, region = _model_of(job, instance_type, region)
    if instance_type == LOCAL_PROCESS:
        return transform_local_process(model_data, source, output, workdir=Path(model_data).resolve().parent / "transform",
                                       concurrency=concurrency, log=log)
    uri = sdk_workflow.run_transform(model_data, str(source), str(output), instance_type, role=role, region=region,
                                     concurrency=concurrency, log=log, line=sdk, image=image)
    if instance_type not in LOCAL_MODES:
        return TransformResult(uri)
    folder = Path(output).resolve()
    return TransformResult(str(folder), written=answered_by_job(folder))


def _model_of(job: TrainingJob | str | os.PathLike, instance_type: str | None,
              region: str | None) -> tuple[str, str, str | None]:
    """(model.tar.gz, instance type, region) for serving a job's model: the type defaults to the job's
    (local-process for a bare path), the region to the job's; local-process needs the archive here."""
    model_data = job.model_data if isinstance(job, TrainingJob) else str(job)
    instance_type = instance_type or (job.instance_type if isinstance(job, TrainingJob) else LOCAL_PROCESS)
    check_instance_type(instance_type)
    if instance_type == LOCAL_PROCESS and model_data.startswith("s3://"):
        raise CovidXrayError(f"local-process serves a local model.tar.gz, not {model_data}: download it first")
    return model_data, instance_type, region or (job.region if isinstance(job, TrainingJob) else None)


def recorded_endpoint(job_dir: str | os.PathLike) -> Endpoint | None:
    described = load_state(job_dir).get("endpoint")
    return endpoint_from_state(described) if described else None
