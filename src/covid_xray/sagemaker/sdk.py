"""The SageMaker Python SDK side of the workflow, for `local`, `local_gpu` and `ml.*` jobs: importing
the SDK (only when one of those runs, so `local-process` never needs it), its sessions and execution
role, the objects it trains and serves with (`PyTorch`, `PyTorchModel`, `Predictor`), and running a
training job through them."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ..errors import CovidXrayError
from . import entry
from .jobs import (
    BASE_JOB_NAME, LOCAL_MODES, LOCAL_PROCESS, Log, TrainingJob, _extract, check_instance_type,
    docker_available, stage_source_dir,
)

# The newest PyTorch release with both a training and an inference container in SDK 2.x
# (image_uri_config/pytorch.json); the same pair serves the model that the job produced.
FRAMEWORK_VERSION = "2.6.0"
PY_VERSION = "py312"
ROLE_ENV = "SAGEMAKER_ROLE"
# Local mode never checks the role, but the SDK wants one; AWS's local-mode examples pass a dummy.
LOCAL_ROLE = "arn:aws:iam::111111111111:role/service-role/AmazonSageMaker-ExecutionRole-local"
LOCAL_CODE_LOCATION = "s3://covid-xray-local-mode/code"  # never written to: see build_model
# Any image type is fine: the endpoint sniffs the bytes, exactly as for image/jpeg or image/png.
IMAGE_CONTENT_TYPE = "application/x-image"
SERVING_ENV = {"SAGEMAKER_PROGRAM": "inference.py", "SAGEMAKER_SUBMIT_DIRECTORY": "/opt/ml/model/code"}


# --- environment checks: one sentence each, never an SDK traceback ----------------------------


def _sdk():
    """Import the SageMaker SDK quietly (it logs config lookups and a v3 notice on import)."""
    os.environ.setdefault("SAGEMAKER_SUPPRESS_V2_WARNING", "1")
    logging.getLogger("sagemaker.config").setLevel(logging.WARNING)
    try:
        import sagemaker
        import sagemaker.local
        import sagemaker.pytorch
        import sagemaker.transformer
    except ImportError:
        raise CovidXrayError(
            "the SageMaker Python SDK is not installed: pip install 'covid-xray[sagemaker]', "
            "or use --instance-type local-process, which needs neither the SDK nor Docker"
        ) from None
    return sagemaker


def _boto_session(region: str | None, *, need_credentials: bool):
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
        # Local mode only needs a region to name the container image.
        session = boto3.Session(region_name="us-east-1")
    return session


def make_session(instance_type: str, region: str | None = None):
    """A LocalSession (after checking Docker) or a Session (after checking credentials)."""
    sagemaker = _sdk()
    if instance_type in LOCAL_MODES:
        if not docker_available():
            raise CovidXrayError(
                "SageMaker local mode needs Docker, which is not installed or not running here: start Docker, "
                "or use --instance-type local-process to run the same entry point without it"
            )
        session = sagemaker.local.LocalSession(boto_session=_boto_session(region, need_credentials=False))
        session.config = {"local": {"local_code": True}}  # keep source and model on this machine, not S3
        return session
    return sagemaker.Session(boto_session=_boto_session(region, need_credentials=True))


def resolve_role(instance_type: str, role: str | None, session) -> str:
    if instance_type in LOCAL_MODES:
        return role or LOCAL_ROLE
    role = role or os.environ.get(ROLE_ENV)
    if role:
        return role
    from botocore.exceptions import BotoCoreError, ClientError

    try:  # works inside SageMaker notebooks and Studio, where the role is the notebook's
        return _sdk().get_execution_role(session)
    except (ValueError, BotoCoreError, ClientError):  # not a role, or AWS would not say
        raise CovidXrayError(
            f"no SageMaker execution role: pass --role arn:aws:iam::ACCOUNT:role/NAME or set {ROLE_ENV}"
        ) from None


# --- the SDK objects ---------------------------------------------------------------------------


def _accelerated(instance_type: str) -> bool:
    """GPU or Trainium: the instance families the SDK allows `torch_distributed` on."""
    family = instance_type.removeprefix("ml.").split(".")[0]
    return instance_type == "local_gpu" or (instance_type.startswith("ml.") and family.startswith(("p", "g", "trn")))


def build_estimator(
    instance_type: str,
    *,
    source_dir: str | os.PathLike,
    hyperparameters: Mapping[str, Any] | None = None,
    instance_count: int = 1,
    role: str | None = None,
    session=None,
    output_path: str | None = None,
    classes: Sequence[str] = entry.DEFAULT_CLASSES,
    max_run_s: int = 4 * 3600,
):
    """The `sagemaker.pytorch.PyTorch` estimator for a `local`, `local_gpu` or `ml.*` job. Pass a
    session to build it without touching Docker or AWS (tests do)."""
    check_instance_type(instance_type, instance_count)
    if instance_type == LOCAL_PROCESS:
        raise CovidXrayError("local-process runs without the SageMaker SDK; use train(), not build_estimator()")
    hyperparameters = dict(hyperparameters or {})
    entry.check_hyperparameters(hyperparameters)
    sagemaker = _sdk()
    session = session or make_session(instance_type)
    extra: dict[str, Any] = {}
    if instance_count > 1:
        # AWS's toolkit then runs train.py under torchrun on every host (one process per GPU, or
        # one per CPU host); train_run joins that process group through Distributed.from_env().
        extra["distribution"] = {"torch_distributed": {"enabled": True}}
        if not _accelerated(instance_type):
            # The SDK only accepts torch_distributed for GPU/Trainium types unless the image is
            # named explicitly; the container's torchrun runner handles CPU hosts fine.
            extra["image_uri"] = sagemaker.image_uris.retrieve(
                "pytorch", region=session.boto_region_name, version=FRAMEWORK_VERSION,
                py_version=PY_VERSION, instance_type=instance_type, image_scope="training",
            )
    return sagemaker.pytorch.PyTorch(
        entry_point="train.py",
        source_dir=str(source_dir),
        framework_version=FRAMEWORK_VERSION,
        py_version=PY_VERSION,
        role=resolve_role(instance_type, role, session),
        instance_type=instance_type,
        instance_count=instance_count,
        hyperparameters=hyperparameters,
        metric_definitions=entry.metric_definitions(classes),
        output_path=output_path,
        base_job_name=BASE_JOB_NAME,
        max_run=max_run_s,
        disable_profiler=True,  # the profiler would start extra rule-evaluation jobs we never read
        debugger_hook_config=False,  # no smdebug hooks in the training loop
        sagemaker_session=session,
        **extra,
    )


def build_model(instance_type: str, model_data: str, *, role: str | None = None, session=None):
    """The `sagemaker.pytorch.PyTorchModel` serving a model.tar.gz as it is: no entry_point, so
    the SDK neither repacks nor re-uploads it, and SAGEMAKER_PROGRAM points the container at the
    code/inference.py the training job put inside."""
    check_instance_type(instance_type)
    sagemaker = _sdk()
    session = session or make_session(instance_type)
    # Nothing is uploaded (no entry_point); naming a code location keeps local mode from looking up,
    # and creating, the account's default S3 bucket.
    extra = {"code_location": LOCAL_CODE_LOCATION} if instance_type in LOCAL_MODES else {}
    return sagemaker.pytorch.PyTorchModel(
        model_data=model_data,
        role=resolve_role(instance_type, role, session),
        framework_version=FRAMEWORK_VERSION,
        py_version=PY_VERSION,
        env=dict(SERVING_ENV),
        sagemaker_session=session,
        **extra,
    )


def build_transformer(instance_type: str, model_name: str, output_path: str, *, session,
                      concurrency: int = 4):
    """The `sagemaker.transformer.Transformer` for a batch transform job on a created model: one request
    per input file (SingleRecord, no splitting), JSON answers written as FILE.out under `output_path`, at most
    `concurrency` requests in flight, payloads up to the endpoint's own body limit."""
    from ..protocol import DEFAULT_MAX_BODY_BYTES, JSON

    return _sdk().transformer.Transformer(
        model_name=model_name, instance_count=1, instance_type=instance_type, strategy="SingleRecord",
        output_path=output_path, accept=JSON, max_concurrent_transforms=concurrency,
        max_payload=DEFAULT_MAX_BODY_BYTES // 2**20, base_transform_job_name=BASE_JOB_NAME, sagemaker_session=session,
    )


def run_sdk_transform(model_data: str, source: str, output: str, instance_type: str, *, role: str | None,
                      region: str | None, concurrency: int, log: Log) -> str:
    """A SageMaker batch transform job (local mode or managed) on model.tar.gz; returns where the .out files are."""
    session = make_session(instance_type, region)
    local = instance_type in LOCAL_MODES
    source = _channel_uri(source, "transform-input", session, local, log)
    if local:  # local mode reads and writes file:// URIs
        model_data, output = file_uri(model_data), file_uri(output)
    model = build_model(instance_type, model_data, role=role, session=session)
    model.create(instance_type=instance_type)
    transformer = build_transformer(instance_type, model.name, output, session=session, concurrency=concurrency)
    try:
        transformer.transform(source, data_type="S3Prefix", content_type=IMAGE_CONTENT_TYPE, split_type=None,
                              wait=True, logs=True)
    finally:
        model.delete_model()
    return output


def _sdk_predictor(endpoint_name: str, session):
    sagemaker = _sdk()
    from sagemaker.deserializers import JSONDeserializer
    from sagemaker.serializers import IdentitySerializer

    return sagemaker.predictor.Predictor(
        endpoint_name, sagemaker_session=session,
        serializer=IdentitySerializer(IMAGE_CONTENT_TYPE), deserializer=JSONDeserializer(),
    )


# --- train through the SDK -----------------------------------------------------------------


def _run_sdk_job(
    inputs: Mapping[str, str], hyperparameters: dict[str, Any], instance_type: str, instance_count: int,
    out: Path, role: str | None, region: str | None, log: Log,
) -> TrainingJob:
    session = make_session(instance_type, region)
    local = instance_type in LOCAL_MODES
    estimator = build_estimator(
        instance_type, source_dir=stage_source_dir(out / "source"), hyperparameters=hyperparameters,
        instance_count=instance_count, role=role, session=session,
        output_path=f"file://{out}" if local else None,
    )
    uris = {name: _channel_uri(value, name, session, local, log) for name, value in inputs.items()}
    estimator.fit(uris, wait=True, logs="All")
    job = TrainingJob(
        name=estimator.latest_training_job.name, instance_type=instance_type,
        model_data=estimator.model_data, region=session.boto_region_name,
    )
    if local:  # local mode leaves model.tar.gz and output.tar.gz under out/<job name>/
        job.model_data = job.model_data.removeprefix("file://")
        output_tar = Path(job.model_data).with_name("output.tar.gz")
        if output_tar.is_file():
            job.output_dir = str(_extract(output_tar, out / job.name / "output" / "data"))
            job.metrics = _metrics_from_output(Path(job.output_dir))
    return job


def _metrics_from_output(output_dir: Path) -> dict[str, float]:
    """The metrics the job's log showed, rebuilt from its metrics.json: local mode streams the
    container's log to the console, not to us."""
    from ..metrics import summary_lines

    test = json.loads((output_dir / "metrics.json").read_text())["test"]
    return entry.scrape_metrics(summary_lines(test, "test"), entry.metric_definitions(list(test["per_class"])))


def file_uri(value: str) -> str:
    """A local path as the file:// URI local mode reads; URIs as they are."""
    return value if value.startswith(("s3://", "file://")) else f"file://{Path(value).resolve()}"


def _channel_uri(value: str, name: str, session, local: bool, log: Log) -> str:
    """Local mode reads file:// URIs; managed SageMaker reads S3, so local folders are uploaded."""
    if local or value.startswith(("s3://", "file://")):
        return file_uri(value)
    path = Path(value).resolve()
    log(f"uploading {path} to S3 (channel {name})")
    return session.upload_data(str(path), key_prefix=f"{BASE_JOB_NAME}/data/{name}")
