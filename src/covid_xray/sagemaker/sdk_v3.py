"""SageMaker Python SDK 3.x (`pip install 'covid-xray[sagemaker]'`), the line AWS's current guides use:
`ModelTrainer` (with `SourceCode`, `Compute`, `InputData`, `Torchrun`) for training, `ModelBuilder` for the
endpoint, `sagemaker.core`'s `Transformer` for batch transform, built from `sdk`'s settings. Local mode is the
SDK's LOCAL_CONTAINER mode (docker compose for training, a container for the endpoint); managed jobs are
SageMaker's. `training_settings` reads a trainer's settings back, as the tests compare them with v2's.

v3's trainer runs train.py through its own driver (sm_train.sh): the source arrives as the `code` channel,
the driver as `sm_drivers`, hyperparameters as `--name value`, requirements.txt installed first. The entry
point takes those two channels for what they are, not for data."""

from __future__ import annotations

import os
import shutil
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

from .jobs import LOCAL_MODES, _extract
from .sdk import ServingSettings, TrainingSettings, TransformSettings

LINE = "v3"
retrieve_image = image_uris.retrieve
execution_role = get_execution_role


def session(boto_session, *, local: bool):
    if not local:
        return Session(boto_session=boto_session)
    local_session = LocalSession(boto_session=boto_session)
    local_session.config = {"local": {"local_code": True}}  # keep source and model on this machine, not S3
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


def build_model(settings: ServingSettings, session, model_dir: str | os.PathLike | None = None):
    """ModelBuilder serving model.tar.gz as it is in the PyTorch inference image (its pass-through path: an
    image and model data, no model object, nothing repacked). Local mode mounts the unpacked archive
    (`model_dir`) at /opt/ml/model and runs the image's `serve`, as the managed endpoint does."""
    # sagemaker.serve makes boto clients as it is imported, which needs a region even for local mode.
    os.environ.setdefault("AWS_DEFAULT_REGION", session.boto_region_name)
    from sagemaker.serve.mode.function_pointers import Mode as ServeMode
    from sagemaker.serve.model_builder import ModelBuilder
    from sagemaker.serve.utils.types import ModelServer

    common = dict(image_uri=settings.image_uri, env_vars=dict(settings.env), role_arn=settings.role,
                  sagemaker_session=session)
    if settings.instance_type in LOCAL_MODES:
        return ModelBuilder(mode=ServeMode.LOCAL_CONTAINER, model_server=ModelServer.TORCHSERVE,
                            model_path=str(model_dir), instance_type=settings.instance_type, **common)
    return ModelBuilder(mode=ServeMode.SAGEMAKER_ENDPOINT, s3_model_data_url=settings.model_data,
                        instance_type=settings.instance_type, **common)


def serving_settings(builder) -> ServingSettings:
    local = str(builder.mode).endswith("LOCAL_CONTAINER")
    return ServingSettings(
        instance_type=builder.instance_type, image_uri=builder.image_uri,
        model_data=f"file://{builder.model_path}" if local else builder.s3_model_data_url,
        env=dict(builder.env_vars), role=builder.role_arn,
    )


def _json(body) -> dict[str, Any]:
    import json

    return json.loads(body.read() if hasattr(body, "read") else body)


class Deployed:
    """A managed endpoint that ModelBuilder made (a sagemaker.core Endpoint resource)."""

    def __init__(self, endpoint: Endpoint, region: str):
        self.endpoint, self.name, self.region = endpoint, endpoint.endpoint_name, region

    def predict(self, image: bytes) -> dict[str, Any]:
        from .sdk import IMAGE_CONTENT_TYPE

        return _json(self.endpoint.invoke(body=image, content_type=IMAGE_CONTENT_TYPE, accept="application/json").body)

    def delete(self) -> None:
        config = EndpointConfig.get(self.endpoint.endpoint_config_name, region=self.region)
        models = [variant.model_name for variant in config.production_variants]
        self.endpoint.delete()
        config.delete()
        for name in models:
            Model.get(name, region=self.region).delete()


class DeployedLocally:
    """ModelBuilder's local container: the image's `serve` on localhost:8080, like local mode's endpoint."""

    def __init__(self, builder, workdir: Path):
        self.builder, self.workdir = builder, workdir
        self.name, self.region = "covid-xray-local", None

    def predict(self, image: bytes) -> dict[str, Any]:
        from .endpoints import LOCAL_MODE_URL, http_invoke

        return http_invoke(LOCAL_MODE_URL, image)

    def delete(self) -> None:
        self.builder.modes[str(self.builder.mode)].destroy_server()
        shutil.rmtree(self.workdir, ignore_errors=True)


def predictor(endpoint_name: str, session) -> Deployed:
    region = session.boto_region_name
    return Deployed(Endpoint.get(endpoint_name, region=region), region)


def deploy(settings: ServingSettings, session):
    if settings.instance_type in LOCAL_MODES:
        archive = Path(settings.model_data.removeprefix("file://"))
        workdir = archive.parent / "endpoint"
        builder = build_model(settings, session, model_dir=_extract(archive, workdir / "model"))
        builder.build()
        builder.deploy()
        return DeployedLocally(builder, workdir)
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
    if serving.instance_type in LOCAL_MODES:
        name = f"{settings.base_job_name}-model-{time.strftime('%Y-%m-%d-%H-%M-%S')}"
        session.sagemaker_client.create_model(
            ModelName=name, ExecutionRoleArn=serving.role,
            PrimaryContainer={"Image": serving.image_uri, "ModelDataUrl": serving.model_data,
                              "Environment": dict(serving.env)},
        )
    else:
        model = build_model(serving, session).build()
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

