"""SageMaker Python SDK 2.x (`pip install 'covid-xray[sagemaker-v2]'`), the line AWS's local-mode samples use:
the `sagemaker.pytorch.PyTorch` estimator, `PyTorchModel` and its `Predictor`, and `sagemaker.transformer`'s
`Transformer`, built from `sdk`'s settings. `training_settings` reads an estimator's settings back, as the
tests compare them with v3's."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import sagemaker
import sagemaker.local
import sagemaker.pytorch
import sagemaker.transformer
from sagemaker.deserializers import JSONDeserializer
from sagemaker.estimator import _TrainingJob
from sagemaker.serializers import IdentitySerializer

from .sdk import (
    FRAMEWORK_VERSION, IMAGE_CONTENT_TYPE, LOCAL_BUCKET, LOCAL_MODE_CONFIG, PY_VERSION, ServingSettings, TrainingSettings,
    TransformSettings,
)

LINE = "v2"
LOCAL_CODE_LOCATION = f"s3://{LOCAL_BUCKET}/code"  # never written to: see build_model
retrieve_image = sagemaker.image_uris.retrieve
execution_role = sagemaker.get_execution_role


def session(boto_session, *, local: bool):
    if not local:
        return sagemaker.Session(boto_session=boto_session)
    local_session = sagemaker.local.LocalSession(boto_session=boto_session, sagemaker_config=LOCAL_MODE_CONFIG)
    local_session.config = {"local": {"local_code": True}}  # keep source and model on this machine, not S3
    return local_session


# --- training --------------------------------------------------------------------------------------


def build_estimator(settings: TrainingSettings, session) -> sagemaker.pytorch.PyTorch:
    extra: dict[str, Any] = {}
    if settings.torchrun:
        extra["distribution"] = {"torch_distributed": {"enabled": True}}
    return sagemaker.pytorch.PyTorch(
        entry_point=settings.entry_point,
        source_dir=settings.source_dir,  # AWS's toolkit pip-installs its requirements.txt first
        framework_version=FRAMEWORK_VERSION,
        py_version=PY_VERSION,
        # Named, not left to the SDK: it is the same image v3 gets, and the SDK accepts torch_distributed
        # on CPU types only when the image is named.
        image_uri=settings.image_uri,
        role=settings.role,
        instance_type=settings.instance_type,
        instance_count=settings.instance_count,
        hyperparameters=settings.hyperparameters,
        metric_definitions=settings.metric_definitions,
        output_path=settings.output_path,
        base_job_name=settings.base_job_name,
        max_run=settings.max_run_s,
        disable_profiler=True,  # the profiler would start extra rule-evaluation jobs we never read
        debugger_hook_config=False,  # no smdebug hooks in the training loop
        sagemaker_session=session,
        **extra,
    )


def training_settings(estimator: sagemaker.pytorch.PyTorch) -> TrainingSettings:
    requirements = Path(estimator.source_dir, "requirements.txt")
    return TrainingSettings(
        instance_type=estimator.instance_type, instance_count=estimator.instance_count,
        image_uri=estimator.training_image_uri(), source_dir=estimator.source_dir,
        entry_point=estimator.entry_point, requirements=requirements.name if requirements.is_file() else "",
        # The SDK JSON-encodes each value; AWS's toolkit decodes it and passes --name value.
        hyperparameters={name: str(json.loads(value)) for name, value in estimator.hyperparameters().items()
                         if not name.startswith("sagemaker_")},  # the toolkit keeps its own keys to itself
        metric_definitions=estimator.metric_definitions,
        torchrun=estimator.distribution == {"torch_distributed": {"enabled": True}},
        role=estimator.role, output_path=estimator.output_path, max_run_s=estimator.max_run,
        base_job_name=estimator.base_job_name,
    )


def training_request(estimator: sagemaker.pytorch.PyTorch, channels: dict[str, str]) -> dict[str, Any]:
    """The CreateTrainingJob request the estimator would send (the channels and what the SDK adds)."""
    estimator._prepare_for_training(job_name=f"{estimator.base_job_name}-request")
    return _TrainingJob._get_train_args(estimator, channels, None)


def fit(settings: TrainingSettings, channels: dict[str, str], session, out: Path) -> tuple[str, str]:
    """Run the job; (job name, model.tar.gz URI). Local mode writes under `settings.output_path`."""
    estimator = build_estimator(settings, session)
    estimator.fit(channels, wait=True, logs="All")
    return estimator.latest_training_job.name, estimator.model_data


# --- serving -----------------------------------------------------------------------------------------


def build_model(settings: ServingSettings, session) -> sagemaker.pytorch.PyTorchModel:
    """No entry_point, so the SDK neither repacks nor re-uploads model.tar.gz, and SAGEMAKER_PROGRAM points the
    container at the code/inference.py the training job put inside."""
    # Nothing is uploaded (no entry_point); naming a code location keeps local mode from looking up,
    # and creating, the account's default S3 bucket.
    extra = {"code_location": LOCAL_CODE_LOCATION} if settings.instance_type.startswith("local") else {}
    return sagemaker.pytorch.PyTorchModel(
        model_data=settings.model_data, image_uri=settings.image_uri, role=settings.role,
        framework_version=FRAMEWORK_VERSION, py_version=PY_VERSION, env=dict(settings.env),
        sagemaker_session=session, **extra,
    )


def serving_settings(model: sagemaker.pytorch.PyTorchModel, instance_type: str) -> ServingSettings:
    return ServingSettings(instance_type=instance_type, image_uri=model.image_uri, model_data=model.model_data,
                           env=dict(model.env), role=model.role)


class Deployed:
    """A deployed endpoint behind the SDK's Predictor."""

    def __init__(self, predictor: sagemaker.predictor.Predictor):
        self.predictor = predictor
        self.name = predictor.endpoint_name
        self.region = predictor.sagemaker_session.boto_region_name

    def predict(self, image: bytes) -> dict[str, Any]:
        return self.predictor.predict(image)

    def delete(self) -> None:
        self.predictor.delete_model()
        self.predictor.delete_endpoint()  # and its endpoint config


def predictor(endpoint_name: str, session) -> Deployed:
    return Deployed(sagemaker.predictor.Predictor(
        endpoint_name, sagemaker_session=session,
        serializer=IdentitySerializer(IMAGE_CONTENT_TYPE), deserializer=JSONDeserializer(),
    ))


def deploy(settings: ServingSettings, session) -> Deployed:
    model = build_model(settings, session)
    model.deploy(initial_instance_count=1, instance_type=settings.instance_type)
    return predictor(model.endpoint_name, session)


# --- batch transform ---------------------------------------------------------------------------------


def build_transformer(settings: TransformSettings, model_name: str, instance_type: str,
                      session) -> sagemaker.transformer.Transformer:
    return sagemaker.transformer.Transformer(
        model_name=model_name, instance_count=1, instance_type=instance_type, strategy=settings.strategy,
        output_path=settings.output_path, accept=settings.accept, max_concurrent_transforms=settings.concurrency,
        max_payload=settings.max_payload_mb, base_transform_job_name=settings.base_job_name,
        sagemaker_session=session,
    )


def transform(serving: ServingSettings, settings: TransformSettings, source: str, session) -> None:
    """Create the model, run the transform job on it, delete the model."""
    model = build_model(serving, session)
    model.create(instance_type=serving.instance_type)
    # Local mode streams the container's log itself; v2's logs=True would read CloudWatch (AWS credentials).
    logs = not isinstance(session, sagemaker.local.LocalSession)
    try:
        build_transformer(settings, model.name, serving.instance_type, session).transform(
            source, data_type="S3Prefix", content_type=settings.content_type, split_type=None, wait=True, logs=logs,
        )
    finally:
        model.delete_model()
