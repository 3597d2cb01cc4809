"""The SageMaker Python SDK side of the workflow, for `local`, `local_gpu` and `ml.*` jobs, on either SDK line:
which line is installed (`sdk_line`), its sessions and execution role, the settings every job and endpoint gets
whichever line builds it (`TrainingSettings`, `ServingSettings`), and the workflow steps that hand them to the
line's own objects — `sdk_v2` (`PyTorch`, `PyTorchModel`, `Transformer`) or `sdk_v3` (`ModelTrainer`,
`ModelBuilder`, `sagemaker.core`'s `Transformer`). The SDK is imported only when one of these runs, so
`local-process` never needs it."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, replace
from importlib import import_module, metadata
from pathlib import Path
from types import ModuleType
from typing import Any

from ..errors import CovidXrayError
from . import entry
from .jobs import (
    BASE_JOB_NAME, LOCAL_MODES, LOCAL_PROCESS, LocalContainers, Log, TrainingJob, _extract, check_instance_type,
    docker_image_exists, docker_problem, stage_source_dir,
)

SDK_LINES = ("v2", "v3")
# The newest PyTorch release with both a training and an inference container in both SDK lines
# (image_uri_config/pytorch.json: 2.6.0 for py312); the same pair serves the model the job produced.
FRAMEWORK_VERSION = "2.6.0"
PY_VERSION = "py312"
ROLE_ENV = "SAGEMAKER_ROLE"
# Local mode never checks the role, but the SDK wants one; AWS's local-mode examples pass a dummy.
LOCAL_ROLE = "arn:aws:iam::111111111111:role/service-role/AmazonSageMaker-ExecutionRole-local"
LOCAL_REGION = "us-east-1"  # local mode only needs a region to name AWS's images
# Named so that local mode never looks up (or creates) the account's default S3 bucket; never written to.
LOCAL_BUCKET = "covid-xray-local-mode"
# Local mode stays on this machine: no telemetry calls to AWS (the SDK's own opt-out setting).
LOCAL_MODE_CONFIG = {"SchemaVersion": "1.0", "SageMaker": {"PythonSDK": {"Modules": {"TelemetryOptOut": True}}}}
# Any image type is fine: the endpoint sniffs the bytes, exactly as for image/jpeg or image/png.
IMAGE_CONTENT_TYPE = "application/x-image"
# An image for local mode, training and serving: what `make sagemaker-image` (docker/build-image.sh) tags when
# AWS's images cannot be pulled; or any image named by --image-uri / this variable.
LOCAL_IMAGE = "covid-xray/sagemaker-pytorch:2.14.1-cpu-py311"
IMAGE_ENV = "COVID_XRAY_SAGEMAKER_IMAGE"
SERVING_ENV = {"SAGEMAKER_PROGRAM": "inference.py", "SAGEMAKER_SUBMIT_DIRECTORY": "/opt/ml/model/code"}
_INSTALL = {"v2": "pip install 'covid-xray[sagemaker-v2]'", "v3": "pip install 'covid-xray[sagemaker]'"}


# --- which SDK line --------------------------------------------------------------------------------


def sdk_line() -> str | None:
    """The installed SageMaker Python SDK line ('v2' or 'v3'), or None."""
    try:
        major = int(metadata.version("sagemaker").split(".")[0])
    except (metadata.PackageNotFoundError, ValueError):
        return None
    return "v2" if major < 3 else "v3"


def line_module(line: str | None = None) -> ModuleType:
    """`sdk_v2` or `sdk_v3`, for the installed line; asking for the other one is one sentence."""
    if line is not None and line not in SDK_LINES:
        raise CovidXrayError(f"unknown SDK line {line!r}: use v2 or v3")
    installed = sdk_line()
    if installed is None or (line is not None and line != installed):
        wanted = line or "v3"
        have = f"SDK {installed} is installed" if installed else "the SageMaker Python SDK is not installed"
        raise CovidXrayError(
            f"{have}, not {wanted}: {_INSTALL[wanted]} (or use --instance-type local-process, which needs "
            "neither the SDK nor Docker)"
        )
    os.environ.setdefault("SAGEMAKER_SUPPRESS_V2_WARNING", "1")  # v2 logs a v3 notice on import
    logging.getLogger("sagemaker.config").setLevel(logging.WARNING)
    try:
        return import_module(f".sdk_{installed}", __package__)
    except ImportError as e:
        raise CovidXrayError(f"the installed SageMaker Python SDK is incomplete ({e}): {_INSTALL[installed]}") from None


# --- sessions and role: one sentence each, never an SDK traceback ----------------------------------


def boto_session(region: str | None, *, need_credentials: bool):
    import boto3

    session = boto3.Session(region_name=region)
    if need_credentials and session.get_credentials() is None:
        raise CovidXrayError(
            "no AWS credentials found: run 'aws configure', set AWS_PROFILE, or set AWS_ACCESS_KEY_ID and "
            "AWS_SECRET_ACCESS_KEY (or use --instance-type local-process, which needs no AWS account)"
        )
    if session.region_name is None:
        if need_credentials:
            raise CovidXrayError("no AWS region configured: pass --region or set AWS_DEFAULT_REGION")
        session = boto3.Session(region_name=LOCAL_REGION)
    return session


def check_docker(instance_type: str) -> None:
    problem = docker_problem() if instance_type in LOCAL_MODES else None
    if problem:
        raise CovidXrayError(problem)


def make_session(instance_type: str, region: str | None = None, line: str | None = None):
    """The line's LocalSession (after checking Docker) or Session (after checking credentials)."""
    sdk = line_module(line)
    check_docker(instance_type)
    local = instance_type in LOCAL_MODES
    return sdk.session(boto_session(region, need_credentials=not local), local=local)


def resolve_role(instance_type: str, role: str | None, session, line: str | None = None) -> str:
    if instance_type in LOCAL_MODES:
        return role or LOCAL_ROLE
    role = role or os.environ.get(ROLE_ENV)
    if role:
        return role
    from botocore.exceptions import BotoCoreError, ClientError

    try:  # works inside SageMaker notebooks and Studio, where the role is the notebook's
        return line_module(line).execution_role(session)
    except (ValueError, BotoCoreError, ClientError):  # not a role, or AWS would not say
        raise CovidXrayError(
            f"no SageMaker execution role: pass --role arn:aws:iam::ACCOUNT:role/NAME or set {ROLE_ENV}"
        ) from None


# --- what every job and endpoint gets, whichever line builds it -------------------------------------


@dataclass(frozen=True)
class TrainingSettings:
    """A training job as both SDK lines describe it: `sdk_v2.build_estimator` and `sdk_v3.build_trainer` turn
    it into their objects, and their `training_settings` read it back from them (tests compare the two)."""

    instance_type: str
    instance_count: int
    image_uri: str
    source_dir: str
    entry_point: str
    requirements: str  # installed by the container before entry_point runs
    hyperparameters: dict[str, str]  # as the container receives them: --name value
    metric_definitions: list[dict[str, str]]
    torchrun: bool  # distribution: torchrun on every host (instance_count > 1)
    role: str
    output_path: str | None  # None: the session's default bucket
    max_run_s: int
    base_job_name: str = BASE_JOB_NAME


@dataclass(frozen=True)
class ServingSettings:
    """A model served from model.tar.gz as it is: the PyTorch inference image runs code/inference.py."""

    instance_type: str
    image_uri: str
    model_data: str
    env: dict[str, str]
    role: str


@dataclass(frozen=True)
class TransformSettings:
    output_path: str
    concurrency: int
    max_payload_mb: int
    strategy: str = "SingleRecord"
    accept: str = "application/json"
    content_type: str = IMAGE_CONTENT_TYPE
    base_job_name: str = BASE_JOB_NAME


def image_uri(scope: str, instance_type: str, region: str, line: str | None = None, image: str | None = None) -> str:
    """The image for this instance type ('training' or 'inference'): `image` when given, else AWS's PyTorch image."""
    return image or line_module(line).retrieve_image(
        "pytorch", region=region, version=FRAMEWORK_VERSION, py_version=PY_VERSION, instance_type=instance_type,
        image_scope=scope,
    )


def local_mode_image(image: str | None, instance_type: str, region: str) -> str | None:
    """The image local mode runs when none is named (`--image-uri`, $COVID_XRAY_SAGEMAKER_IMAGE): AWS's when it is
    here or can be pulled, else the one `make sagemaker-image` builds (docker/), else one sentence. Managed jobs
    get AWS's unless one is named (None: the settings name it)."""
    image = image or os.environ.get(IMAGE_ENV)
    if image or instance_type not in LOCAL_MODES:
        return image
    if all(docker_image_exists(image_uri(scope, instance_type, region)) for scope in ("training", "inference")):
        return None
    if instance_type == "local" and docker_image_exists(LOCAL_IMAGE):
        return LOCAL_IMAGE
    if boto_session(None, need_credentials=False).get_credentials() is not None:
        return None  # the SDK logs in to AWS's registry and pulls AWS's images
    raise CovidXrayError(
        "no image for SageMaker local mode here: build one with 'make sagemaker-image' (no registry needed), pass "
        "--image-uri, or configure AWS credentials so that the SDK can pull AWS's PyTorch images"
    )


def local_mode_problem() -> str | None:
    """Why `local` cannot run here as it is (one sentence), or None: it needs an SDK, Docker with compose, and an image."""
    if sdk_line() is None:
        return f"the SageMaker Python SDK is not installed ({_INSTALL['v3']})"
    try:
        check_docker("local")
        local_mode_image(None, "local", LOCAL_REGION)
    except CovidXrayError as e:
        return str(e)
    return None


def training_settings(
    instance_type: str,
    *,
    source_dir: str | os.PathLike,
    session,
    hyperparameters: Mapping[str, Any] | None = None,
    instance_count: int = 1,
    role: str | None = None,
    output_path: str | None = None,
    classes: Sequence[str] = entry.DEFAULT_CLASSES,
    max_run_s: int = 4 * 3600,
    image: str | None = None,
    line: str | None = None,
) -> TrainingSettings:
    check_instance_type(instance_type, instance_count)
    if instance_type == LOCAL_PROCESS:
        raise CovidXrayError("local-process runs without the SageMaker SDK; use launcher.train(), not the SDK objects")
    hyperparameters = dict(hyperparameters or {})
    entry.check_hyperparameters(hyperparameters)
    return TrainingSettings(
        instance_type=instance_type, instance_count=instance_count,
        image_uri=image_uri("training", instance_type, session.boto_region_name, line, image),
        source_dir=str(source_dir), entry_point="train.py", requirements="requirements.txt",
        hyperparameters={name: str(value) for name, value in hyperparameters.items()},
        metric_definitions=entry.metric_definitions(classes),
        # AWS's toolkit (v2) or the SDK's Torchrun driver (v3) then runs train.py under torchrun on every
        # host; train_run joins that process group through Distributed.from_env().
        torchrun=instance_count > 1,
        role=resolve_role(instance_type, role, session, line), output_path=output_path, max_run_s=max_run_s,
    )


def serving_settings(instance_type: str, model_data: str, *, session, role: str | None = None,
                     image: str | None = None, line: str | None = None) -> ServingSettings:
    check_instance_type(instance_type)
    return ServingSettings(
        instance_type=instance_type, image_uri=image_uri("inference", instance_type, session.boto_region_name, line, image),
        model_data=model_data, env=dict(SERVING_ENV), role=resolve_role(instance_type, role, session, line),
    )


def build_trainer(settings: TrainingSettings, session, line: str | None = None):
    """The line's own training object: a `sagemaker.pytorch.PyTorch` estimator (v2) or a `ModelTrainer` (v3)."""
    sdk = line_module(line)
    return sdk.build_estimator(settings, session) if sdk.LINE == "v2" else sdk.build_trainer(settings, session)


# --- the workflow steps, through the installed line -------------------------------------------------


def run_training(
    inputs: Mapping[str, str], hyperparameters: dict[str, Any], instance_type: str, instance_count: int,
    out: Path, role: str | None, region: str | None, log: Log, line: str | None = None, image: str | None = None,
) -> TrainingJob:
    sdk = line_module(line)
    session = make_session(instance_type, region, line)
    local = instance_type in LOCAL_MODES
    settings = training_settings(
        instance_type, source_dir=stage_source_dir(out / "source"), session=session,
        hyperparameters=hyperparameters, instance_count=instance_count, role=role,
        output_path=file_uri(str(out)) if local else None,
        image=local_mode_image(image, instance_type, session.boto_region_name), line=line,
    )
    log(f"training image: {settings.image_uri}")
    channels = {name: channel_uri(value, name, session, local, log) for name, value in inputs.items()}
    with LocalContainers(settings.image_uri) if local else nullcontext():
        name, model_data = sdk.fit(settings, channels, session, out)
    job = TrainingJob(name=name, instance_type=instance_type, model_data=model_data,
                      region=session.boto_region_name, sdk=sdk.LINE)
    if local:  # local mode leaves model.tar.gz and output.tar.gz side by side on this machine
        job.model_data = job.model_data.removeprefix("file://")
        output_tar = Path(job.model_data).with_name("output.tar.gz")
        if output_tar.is_file():
            # Both lines tar the container's whole /opt/ml/output: the reports are in its data/.
            job.output_dir = str(_extract(output_tar, out / name / "output") / "data")
            job.metrics = metrics_from_output(Path(job.output_dir))
    return job


def deploy(model_data: str, instance_type: str, *, role: str | None, region: str | None, line: str | None = None,
           image: str | None = None):
    """A SageMaker endpoint (local mode or managed) serving model.tar.gz: an `endpoints.SageMakerEndpoint`."""
    from .endpoints import SageMakerEndpoint

    sdk = line_module(line)
    session = make_session(instance_type, region, line)
    if instance_type in LOCAL_MODES:
        model_data = file_uri(model_data)
    settings = serving_settings(instance_type, model_data, session=session, role=role,
                                image=local_mode_image(image, instance_type, session.boto_region_name), line=line)
    containers = LocalContainers(settings.image_uri) if instance_type in LOCAL_MODES else None
    try:
        deployed = sdk.deploy(settings, session)
    except BaseException:
        if containers:
            containers.remove()
        raise
    return SageMakerEndpoint(deployed, instance_type, sdk.LINE, containers)


def predictor(endpoint_name: str, instance_type: str, region: str | None, line: str | None = None):
    """The endpoint `deploy` made, reached again from another process (managed endpoints)."""
    return line_module(line).predictor(endpoint_name, make_session(instance_type, region, line))


def run_transform(model_data: str, source: str, output: str, instance_type: str, *, role: str | None,
                  region: str | None, concurrency: int, log: Log, line: str | None = None,
                  image: str | None = None) -> str:
    """A SageMaker batch transform job (local mode or managed) on model.tar.gz; returns where the .out files are."""
    from ..protocol import DEFAULT_MAX_BODY_BYTES

    sdk = line_module(line)
    session = make_session(instance_type, region, line)
    local = instance_type in LOCAL_MODES
    if local:  # local mode reads and writes file:// URIs
        model_data = file_uri(model_data)
        runs = [(file_uri(str(folder)), file_uri(str(Path(output) / rel))) for rel, folder in _local_folders(source)]
        if len(runs) > 1:
            log(f"local mode: one transform job for each of the {len(runs)} folders holding files (its file:// input "
                "reads a folder's own files only, where an S3 prefix holds the files of every subfolder)")
    else:
        runs = [(channel_uri(source, "transform-input", session, local, log), output)]
    settings = serving_settings(instance_type, model_data, session=session, role=role,
                                image=local_mode_image(image, instance_type, session.boto_region_name), line=line)
    # One request per input file (SingleRecord, no splitting), JSON answers as FILE.out, at most `concurrency`
    # requests in flight, payloads up to the endpoint's own body limit (MB).
    transform = TransformSettings(output_path=output, concurrency=concurrency,
                                  max_payload_mb=DEFAULT_MAX_BODY_BYTES // 2**20)
    with LocalContainers(settings.image_uri) if local else nullcontext():
        for source_uri, output_uri in runs:
            sdk.transform(settings, replace(transform, output_path=output_uri), source_uri, session)
    return file_uri(output) if local else output


def _local_folders(source: str) -> list[tuple[str, Path]]:
    """(path relative to `source`, folder) for `source` and every folder under it that holds input files."""
    from .transform import input_files

    root = Path(source.removeprefix("file://")).resolve()
    if root.is_file():
        return [(".", root)]
    return [(str(folder.relative_to(root)), folder) for folder in sorted({f.parent for f in input_files(root)})]


# --- shared helpers ----------------------------------------------------------------------------------


def metrics_from_output(output_dir: Path) -> dict[str, float]:
    """The metrics the job's log showed, rebuilt from its metrics.json: local mode streams the
    container's log to the console, not to us."""
    from ..metrics import summary_lines

    test = json.loads((output_dir / "metrics.json").read_text())["test"]
    return entry.scrape_metrics(summary_lines(test, "test"), entry.metric_definitions(list(test["per_class"])))


def file_uri(value: str) -> str:
    """A local path as the file:// URI local mode reads; URIs as they are."""
    return value if value.startswith(("s3://", "file://")) else f"file://{Path(value).resolve()}"


def channel_uri(value: str, name: str, session, local: bool, log: Log) -> str:
    """Local mode reads file:// URIs; managed SageMaker reads S3, so local folders are uploaded."""
    if local or value.startswith(("s3://", "file://")):
        return file_uri(value)
    path = Path(value).resolve()
    log(f"uploading {path} to S3 (channel {name})")
    return session.upload_data(str(path), key_prefix=f"{BASE_JOB_NAME}/data/{name}")
