"""SageMaker Python SDK 3.x (`pip install 'covid-xray[sagemaker]'`), the line AWS's current guides use:
`ModelTrainer` (with `SourceCode`, `Compute`, `InputData`, `Torchrun`) for training, `ModelBuilder` for the
endpoint, `sagemaker.core`'s `Transformer` for batch transform, built from `sdk`'s settings. Local mode is the
SDK's LOCAL_CONTAINER mode (docker compose for training, a container for the endpoint); managed jobs are
SageMaker's. `training_settings` reads a trainer's settings back, as the tests compare them with v2's.

v3's trainer runs train.py through its own driver (sm_train.sh): the source arrives as the `code` channel,
the driver as `sm_drivers`, hyperparameters as `--name value`, requirements.txt installed first. The entry
point takes those two channels for what they are, not for data."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from sagemaker.core import image_uris
from sagemaker.core.helper.session_helper import Session, get_execution_role
from sagemaker.core.local import LocalSession
from sagemaker.core.resources import Endpoint, EndpointConfig, Model
from sagemaker.core.shapes import MetricDefinition
from sagemaker.core.training.configs import Compute, InputData, OutputDataConfig, SourceCode, StoppingCondition
from sagemaker.core.transformer import Transformer
from sagemaker.train import ModelTrainer
from sagemaker.train.distributed import Torchrun
from sagemaker.train.model_trainer import Mode

from ..protocol import JSON
from .jobs import BASE_JOB_NAME, LOCAL_MODES
from .sdk import IMAGE_CONTENT_TYPE, LOCAL_BUCKET, LOCAL_MODE_CONFIG, ServingSettings, TrainingSettings, TransformSettings

LINE = "v3"
retrieve_image = image_uris.retrieve
execution_role = get_execution_role


def session(boto_session, *, local: bool):
    if not local:
        return Session(boto_session=boto_session)
    local_session = LocalSession(boto_session=boto_session, sagemaker_config=LOCAL_MODE_CONFIG)
    local_session.config = {"local": {"local_code": True}}  # keep source and model on this machine, not S3
    # ModelBuilder asks for the default bucket even in local mode, which would look up (or create) the account's;
    # setting the resolved name is the only way the session offers to say "this one, do not check".
    local_session._default_bucket = LOCAL_BUCKET
    return local_session


# --- training --------------------------------------------------------------------------------------


def build_trainer(settings: TrainingSettings, session, channels: dict[str, str] | None = None,
                  local_root: str | os.PathLike | None = None) -> ModelTrainer:
    """The ModelTrainer; `channels` become its InputData (local paths for local mode, s3:// for managed)."""
    local = settings.instance_type in LOCAL_MODES
    extra: dict[str, Any] = {}
    if local:
        extra["local_container_root"] = str(local_root or Path.cwd())
    elif settings.output_path:
        extra["output_data_config"] = OutputDataConfig(s3_output_path=settings.output_path)
    trainer = ModelTrainer(
        training_mode=Mode.LOCAL_CONTAINER if local else Mode.SAGEMAKER_TRAINING_JOB,
        sagemaker_session=session,
        role=settings.role,
        base_job_name=settings.base_job_name,
        training_image=settings.image_uri,
        source_code=SourceCode(source_dir=settings.source_dir, entry_script=settings.entry_point,
                               requirements=settings.requirements),
        compute=Compute(instance_type=settings.instance_type, instance_count=settings.instance_count),
        distributed=Torchrun() if settings.torchrun else None,
        hyperparameters=dict(settings.hyperparameters),
        stopping_condition=StoppingCondition(max_runtime_in_seconds=settings.max_run_s),
        input_data_config=[
            InputData(channel_name=name, data_source=uri.removeprefix("file://") if local else uri)
            for name, uri in (channels or {}).items()
        ] or None,
        **extra,
    )
    return trainer.with_metric_definitions(
        [MetricDefinition(name=d["Name"], regex=d["Regex"]) for d in settings.metric_definitions]
    )


def training_settings(trainer: ModelTrainer) -> TrainingSettings:
    local = trainer.training_mode == Mode.LOCAL_CONTAINER
    output = None if local or trainer.output_data_config is None else trainer.output_data_config.s3_output_path
    return TrainingSettings(
        instance_type=trainer.compute.instance_type, instance_count=trainer.compute.instance_count,
        image_uri=trainer.training_image, source_dir=trainer.source_code.source_dir,
        entry_point=trainer.source_code.entry_script, requirements=trainer.source_code.requirements,
        hyperparameters=dict(trainer.hyperparameters),
        metric_definitions=[{"Name": d.name, "Regex": d.regex} for d in trainer._metric_definitions or []],
        torchrun=isinstance(trainer.distributed, Torchrun), role=trainer.role, output_path=output,
        max_run_s=trainer.stopping_condition.max_runtime_in_seconds, base_job_name=trainer.base_job_name,
    )


def fit(settings: TrainingSettings, channels: dict[str, str], session, out: Path) -> tuple[str, str]:
    """Run the job; (job name, model.tar.gz: a local path in local mode, else its s3:// URI)."""
    if settings.instance_type in LOCAL_MODES:
        name = f"{settings.base_job_name}-{time.strftime('%Y-%m-%d-%H-%M-%S')}"
        root = out / name  # the SDK leaves compressed_artifacts/{model,output}.tar.gz here
        root.mkdir(parents=True, exist_ok=True)
        build_trainer(settings, session, channels, local_root=root).train(wait=True, logs=True)
        return name, str(root / "compressed_artifacts" / "model.tar.gz")
    trainer = build_trainer(settings, session, channels)
    trainer.train(wait=True, logs=True)
    job = trainer._latest_training_job  # what ModelBuilder itself reads a finished trainer's artifacts from
    return job.training_job_name, job.model_artifacts.s3_model_artifacts


# --- serving -----------------------------------------------------------------------------------------


def build_model(settings: ServingSettings, session):
    """Managed: ModelBuilder serving model.tar.gz as it is in the PyTorch inference image (its pass-through path:
    an image and model data, no model object, nothing repacked). Local mode: the same model as a CreateModel
    request to sagemaker.core's local-mode service (LocalSession), which runs it under docker compose as v2 does;
    ModelBuilder's own LOCAL_CONTAINER mode always pulls its image, so it cannot serve one built here."""
    if settings.instance_type in LOCAL_MODES:
        return {
            "ModelName": f"{BASE_JOB_NAME}-model-{time.strftime('%Y-%m-%d-%H-%M-%S')}",
            "ExecutionRoleArn": settings.role,
            "PrimaryContainer": {"Image": settings.image_uri, "ModelDataUrl": settings.model_data,
                                 "Environment": dict(settings.env)},
        }
    # sagemaker.serve makes boto clients as it is imported, which needs a region.
    os.environ.setdefault("AWS_DEFAULT_REGION", session.boto_region_name)
    from sagemaker.serve.mode.function_pointers import Mode as ServeMode
    from sagemaker.serve.model_builder import ModelBuilder

    return ModelBuilder(mode=ServeMode.SAGEMAKER_ENDPOINT, image_uri=settings.image_uri,
                        s3_model_data_url=settings.model_data, env_vars=dict(settings.env), role_arn=settings.role,
                        instance_type=settings.instance_type, sagemaker_session=session)


def serving_settings(model, instance_type: str) -> ServingSettings:
    if isinstance(model, dict):  # local mode's CreateModel request
        container = model["PrimaryContainer"]
        return ServingSettings(instance_type=instance_type, image_uri=container["Image"],
                               model_data=container["ModelDataUrl"], env=dict(container["Environment"]),
                               role=model["ExecutionRoleArn"])
    return ServingSettings(instance_type=model.instance_type, image_uri=model.image_uri,
                           model_data=model.s3_model_data_url, env=dict(model.env_vars), role=model.role_arn)


def _json(body) -> dict[str, Any]:
    return json.loads(body.read() if hasattr(body, "read") else body)


class Deployed:
    """A managed endpoint that ModelBuilder made (a sagemaker.core Endpoint resource)."""

    def __init__(self, endpoint: Endpoint, region: str):
        self.endpoint, self.name, self.region = endpoint, endpoint.endpoint_name, region

    def predict(self, image: bytes) -> dict[str, Any]:
        return _json(self.endpoint.invoke(body=image, content_type=IMAGE_CONTENT_TYPE, accept=JSON).body)

    def delete(self) -> None:
        config = EndpointConfig.get(self.endpoint.endpoint_config_name, region=self.region)
        models = [variant.model_name for variant in config.production_variants]
        self.endpoint.delete()
        config.delete()
        for name in models:
            Model.get(name, region=self.region).delete()


class DeployedLocally:
    """An endpoint of local mode's service: the image's `serve` under docker compose, on localhost:8080."""

    def __init__(self, session, model: dict):
        self.session, self.model = session, model
        self.name, self.region = model["ModelName"].replace("-model-", "-endpoint-"), session.boto_region_name

    def predict(self, image: bytes) -> dict[str, Any]:
        response = self.session.sagemaker_runtime_client.invoke_endpoint(
            EndpointName=self.name, Body=image, ContentType=IMAGE_CONTENT_TYPE, Accept=JSON)
        return _json(response["Body"])

    def delete(self) -> None:
        client = self.session.sagemaker_client
        client.delete_endpoint(EndpointName=self.name)  # stops the containers
        client.delete_endpoint_config(EndpointConfigName=self.name)
        client.delete_model(ModelName=self.model["ModelName"])


def predictor(endpoint_name: str, session) -> Deployed:
    region = session.boto_region_name
    return Deployed(Endpoint.get(endpoint_name, region=region), region)


def deploy(settings: ServingSettings, session):
    if settings.instance_type in LOCAL_MODES:
        model = build_model(settings, session)
        deployed = DeployedLocally(session, model)
        client = session.sagemaker_client
        client.create_model(**model)
        client.create_endpoint_config(EndpointConfigName=deployed.name, ProductionVariants=[{
            "VariantName": "AllTraffic", "ModelName": model["ModelName"], "InitialInstanceCount": 1,
            "InstanceType": settings.instance_type}])
        client.create_endpoint(EndpointName=deployed.name, EndpointConfigName=deployed.name)  # waits for /ping
        return deployed
    builder = build_model(settings, session)
    builder.build()
    return Deployed(builder.deploy(initial_instance_count=1, instance_type=settings.instance_type),
                    session.boto_region_name)


# --- batch transform ---------------------------------------------------------------------------------


def build_transformer(settings: TransformSettings, model_name: str, instance_type: str, session) -> Transformer:
    return Transformer(
        model_name=model_name, instance_count=1, instance_type=instance_type, strategy=settings.strategy,
        output_path=settings.output_path, accept=settings.accept, max_concurrent_transforms=settings.concurrency,
        max_payload=settings.max_payload_mb, base_transform_job_name=settings.base_job_name,
        sagemaker_session=session,
    )


def transform(serving: ServingSettings, settings: TransformSettings, source: str, session) -> None:
    """Create the model, run the transform job on it, delete the model. Managed: the Model that ModelBuilder
    builds; local mode: the same model created in local mode's own service (LocalSession), which runs the
    transform containers through docker compose."""
    model = build_model(serving, session)
    if serving.instance_type in LOCAL_MODES:
        session.sagemaker_client.create_model(**model)
        name = model["ModelName"]
    else:
        model = model.build()
        name = model.model_name
    try:
        build_transformer(settings, name, serving.instance_type, session).transform(
            source, data_type="S3Prefix", content_type=settings.content_type, split_type=None, wait=True, logs=True,
        )
    finally:
        if serving.instance_type in LOCAL_MODES:
            session.sagemaker_client.delete_model(ModelName=name)
        else:
            model.delete()

