"""The launcher's SageMaker SDK objects, for the SDK line installed here, built without contacting AWS: the
settings every job, endpoint and transform gets (`sdk.TrainingSettings`, ...) read back from the line's own
objects field by field, the requests they would send, and one sentence for each thing that is missing.

CI runs this file twice: in the project's environment (SDK v3, the `sagemaker` extra) and in a small second
one with SDK v2 only (`make test-sdk-v2`); the test at the end runs the other line's interpreter, when there is
one, and checks that both lines build the same settings."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from covid_xray.errors import CovidXrayError
from covid_xray.sagemaker import endpoints, entry, jobs
from covid_xray.sagemaker import sdk as sdk_objects

ROOT = Path(__file__).resolve().parents[1]
LINE = sdk_objects.sdk_line()
OTHER_PYTHON_ENV = "COVID_XRAY_OTHER_SDK_PYTHON"  # an interpreter with the other SDK line (CI: .venv-v2)
ROLE = "arn:aws:iam::123456789012:role/SageMakerRole"
REGION = "eu-west-1"
ECR = f"763104351884.dkr.ecr.{REGION}.amazonaws.com"
needs_sdk = pytest.mark.skipif(LINE is None, reason="the SageMaker SDK is not installed: pip install -e '.[sagemaker]'")
only_v2 = pytest.mark.skipif(LINE != "v2", reason=f"SDK v2 objects; SDK {LINE} is installed here (CI: make test-sdk-v2)")
only_v3 = pytest.mark.skipif(LINE != "v3", reason=f"SDK v3 objects; SDK {LINE} is installed here")


@pytest.fixture
def sdk():
    """sdk_v2 or sdk_v3: the installed line's module."""
    if LINE is None:
        pytest.skip("the SageMaker SDK is not installed: pip install -e '.[sagemaker]'")
    return sdk_objects.line_module()


@pytest.fixture
def offline_boto():
    """A boto3 session with made-up credentials whose every HTTP request fails the test."""
    boto3 = pytest.importorskip("boto3", reason="the SageMaker SDK is not installed")

    def refuse(request, **_):
        raise AssertionError(f"contacted AWS: {request.method} {request.url}")

    session = boto3.Session(aws_access_key_id="AKIAEXAMPLE", aws_secret_access_key="example", region_name=REGION)
    session.events.register("before-send", refuse)
    return session


@pytest.fixture
def source_dir(tmp_path) -> Path:
    return jobs.stage_source_dir(tmp_path / "source")


def test_source_dir_holds_train_py_the_package_and_requirements(source_dir):
    assert (source_dir / "train.py").read_text() == entry.TRAIN_SCRIPT.read_text()
    assert (source_dir / "covid_xray" / "sagemaker" / "entry.py").is_file()
    assert (source_dir / "requirements.txt").read_text().split() == list(entry.TRAINING_REQUIREMENTS)


# --- what every job gets, read back from the line's own objects --------------------------------------


@needs_sdk
def test_local_mode_training_settings(sdk, offline_boto, source_dir):
    session = sdk.session(offline_boto, local=True)
    settings = sdk_objects.training_settings(
        "local", source_dir=source_dir, session=session, hyperparameters={"epochs": 2, "image-size": 160},
        output_path="file:///tmp/covid-xray-out",
    )
    assert settings == sdk_objects.TrainingSettings(
        instance_type="local", instance_count=1, image_uri=f"{ECR}/pytorch-training:2.6.0-cpu-py312",
        source_dir=str(source_dir), entry_point="train.py", requirements="requirements.txt",
        hyperparameters={"epochs": "2", "image-size": "160"}, metric_definitions=entry.metric_definitions(),
        torchrun=False, role=sdk_objects.LOCAL_ROLE, output_path="file:///tmp/covid-xray-out", max_run_s=4 * 3600,
        base_job_name="covid-xray",
    )
    trainer = sdk_objects.build_trainer(settings, session)
    read_back = sdk.training_settings(trainer)
    # Local mode writes to output_path under v2; v3's LOCAL_CONTAINER mode writes under its container root.
    assert read_back == (settings if sdk.LINE == "v2" else _replace(settings, output_path=None))

    two = sdk_objects.build_trainer(sdk_objects.training_settings("local", source_dir=source_dir, session=session,
                                                      instance_count=2), session)
    assert sdk.training_settings(two).torchrun and sdk.training_settings(two).instance_count == 2


@needs_sdk
def test_managed_training_settings(sdk, offline_boto, source_dir, monkeypatch):
    # v3 checks a managed job's role with IAM as the trainer is made; that is AWS's side, not ours.
    monkeypatch.setenv("SAGEMAKER_VALIDATE_ROLE", "false")
    session = sdk.session(offline_boto, local=False)
    settings = sdk_objects.training_settings(
        "ml.m5.xlarge", source_dir=source_dir, session=session, hyperparameters={"epochs": 12}, role=ROLE,
        output_path="s3://covid-xray-test-bucket/jobs",
    )
    assert (settings.image_uri, settings.role, settings.hyperparameters) == (
        f"{ECR}/pytorch-training:2.6.0-cpu-py312", ROLE, {"epochs": "12"})
    assert sdk.training_settings(sdk_objects.build_trainer(settings, session)) == settings

    gpus = sdk_objects.training_settings("ml.g5.2xlarge", source_dir=source_dir, session=session, instance_count=4,
                                         role=ROLE, output_path="s3://covid-xray-test-bucket/jobs")
    assert gpus.image_uri == f"{ECR}/pytorch-training:2.6.0-gpu-py312" and gpus.torchrun
    assert sdk.training_settings(sdk_objects.build_trainer(gpus, session)) == gpus


def _replace(settings, **changes):
    from dataclasses import replace

    return replace(settings, **changes)


@only_v2
def test_v2_request_runs_train_py_from_the_source_dir(sdk, offline_boto, source_dir):
    session = sdk.session(offline_boto, local=True)
    estimator = sdk.build_estimator(sdk_objects.training_settings("local", source_dir=source_dir, session=session),
                                    session)
    request = sdk.training_request(estimator, {"train": "file:///data/train", "test": "file:///data/test"})
    hps = request["hyperparameters"]
    assert json.loads(hps["sagemaker_program"]) == "train.py"
    assert json.loads(hps["sagemaker_submit_directory"]) == f"file://{source_dir}"
    assert "sagemaker_torch_distributed_enabled" not in hps
    assert [c["ChannelName"] for c in request["input_config"]] == ["train", "test"]
    assert request["profiler_config"] == {"DisableProfiler": True} and "debugger_hook_config" not in request

    two = sdk.build_estimator(sdk_objects.training_settings("local", source_dir=source_dir, session=session,
                                                            instance_count=2), session)
    request = sdk.training_request(two, {"train": "file:///data/train"})
    assert request["hyperparameters"]["sagemaker_torch_distributed_enabled"] == "true"
    assert request["resource_config"]["InstanceCount"] == 2


@only_v3
def test_v3_request_runs_train_py_through_the_sdk_driver(sdk, offline_boto, source_dir, tmp_path):
    session = sdk.session(offline_boto, local=True)
    settings = sdk_objects.training_settings("local", source_dir=source_dir, session=session,
                                             hyperparameters={"epochs": 2, "amp": False})
    trainer = sdk.build_trainer(settings, session, {"train": f"file://{tmp_path}", "test": str(tmp_path)},
                                local_root=tmp_path)
    request = trainer._create_training_job_args()
    channels = {c.channel_name: c for c in request["input_data_config"]}
    # The data, then what the SDK adds: the source dir and its driver (which the entry point must not read as data).
    assert list(channels) == ["train", "test", *entry.SDK_CHANNELS]
    assert channels["train"].data_source.file_system_data_source.directory_path == str(tmp_path)
    assert request["hyper_parameters"] == {"epochs": "2", "amp": "False"}  # --epochs 2 --amp False
    assert request["algorithm_specification"].training_image == settings.image_uri
    assert request["algorithm_specification"].container_entrypoint == ["/bin/bash"]
    assert request["resource_config"].instance_type == "local"
    assert [m.name for m in request["algorithm_specification"].metric_definitions] == [
        d["Name"] for d in entry.metric_definitions()]
    driver = Path(channels["sm_drivers"].data_source.file_system_data_source.directory_path)
    assert "install_requirements.py requirements.txt" in (driver / "sm_train.sh").read_text()
    assert json.loads((driver / "sourcecode.json").read_text())["entry_script"] == "train.py"


def test_entry_point_ignores_the_channels_sdk_v3_adds():
    env = entry.SageMakerEnv.from_environ({
        "SM_CHANNELS": '["code", "sm_drivers", "test", "train", "hospital"]', "SM_CHANNEL_TRAIN": "/d/train",
        "SM_CHANNEL_TEST": "/d/test", "SM_CHANNEL_CODE": "/opt/ml/input/data/code",
        "SM_CHANNEL_SM_DRIVERS": "/opt/ml/input/data/sm_drivers", "SM_CHANNEL_HOSPITAL": "/d/hospital",
    })
    assert (env.train, env.test, env.sources) == ("/d/train", "/d/test", {"hospital": "/d/hospital"})


# --- serving and batch transform ---------------------------------------------------------------------


@needs_sdk
def test_models_serve_the_tarball_as_is(sdk, offline_boto, tmp_path):
    local = sdk.session(offline_boto, local=True)
    settings = sdk_objects.serving_settings("local", f"file://{tmp_path}", session=local)
    assert settings == sdk_objects.ServingSettings(
        instance_type="local", image_uri=f"{ECR}/pytorch-inference:2.6.0-cpu-py312", model_data=f"file://{tmp_path}",
        env={"SAGEMAKER_PROGRAM": "inference.py", "SAGEMAKER_SUBMIT_DIRECTORY": "/opt/ml/model/code"},
        role=sdk_objects.LOCAL_ROLE,
    )
    assert sdk.serving_settings(sdk.build_model(settings, local), "local") == settings

    managed = sdk.session(offline_boto, local=False)
    settings = sdk_objects.serving_settings("ml.m5.large", "s3://bucket/job/output/model.tar.gz", session=managed,
                                            role=ROLE)
    assert settings.image_uri == f"{ECR}/pytorch-inference:2.6.0-cpu-py312" and settings.role == ROLE
    assert sdk.serving_settings(sdk.build_model(settings, managed), "ml.m5.large") == settings  # not repacked


@only_v2
def test_v2_container_serves_the_archive_without_repacking(sdk, offline_boto):
    session = sdk.session(offline_boto, local=True)
    model = sdk.build_model(sdk_objects.serving_settings("local", "file:///tmp/job/model.tar.gz", session=session),
                            session)
    container = model.prepare_container_def(instance_type="local")
    assert container["Image"] == f"{ECR}/pytorch-inference:2.6.0-cpu-py312"
    assert container["ModelDataUrl"] == "file:///tmp/job/model.tar.gz" and model.entry_point is None
    assert container["Environment"]["SAGEMAKER_PROGRAM"] == "inference.py"


@needs_sdk
def test_transformer_sends_each_file_as_one_request_and_writes_json(sdk, offline_boto):
    for instance_type, local, output in (("local", True, "file:///tmp/job/transform"),
                                         ("ml.m5.xlarge", False, "s3://bucket/job/transform")):
        settings = sdk_objects.TransformSettings(output_path=output, concurrency=3, max_payload_mb=20)
        transformer = sdk.build_transformer(settings, "covid-xray-model", instance_type,
                                            sdk.session(offline_boto, local=local))
        assert (transformer.model_name, transformer.instance_type, transformer.instance_count) == (
            "covid-xray-model", instance_type, 1)
        # One request per file, never split or batched into one body; the endpoint's JSON as FILE.out.
        assert (transformer.strategy, transformer.assemble_with, transformer.accept) == ("SingleRecord", None,
                                                                                         "application/json")
        assert (transformer.max_concurrent_transforms, transformer.max_payload) == (3, 20)  # 20 MB, as serve takes
        assert transformer.output_path == output and transformer.base_transform_job_name == jobs.BASE_JOB_NAME


# --- both lines build the same settings --------------------------------------------------------------

SETTINGS_SCRIPT = """
import dataclasses, json, os, sys
import boto3
os.environ["SAGEMAKER_VALIDATE_ROLE"] = "false"  # v3 checks a managed job's role with IAM; not offline
from covid_xray.sagemaker import jobs, sdk as s
line = s.line_module()
boto = boto3.Session(aws_access_key_id="AKIAEXAMPLE", aws_secret_access_key="example", region_name="eu-west-1")
boto.events.register("before-send", lambda request, **_: sys.exit(f"contacted AWS: {request.url}"))
source = jobs.stage_source_dir(sys.argv[1])
out = {}
for instance_type, local, output in (("local", True, None), ("ml.m5.xlarge", False, "s3://b/jobs")):
    session = line.session(boto, local=local)
    settings = s.training_settings(instance_type, source_dir=source, session=session, hyperparameters={"epochs": 6},
                                   role="arn:aws:iam::123456789012:role/R", output_path=output)
    trainer = s.build_trainer(settings, session)
    model_data = "file:///tmp/m" if local else "s3://b/m/model.tar.gz"
    serving = s.serving_settings(instance_type, model_data, session=session, role="arn:aws:iam::123456789012:role/R")
    model = line.build_model(serving, session)
    out[instance_type] = {"training": dataclasses.asdict(line.training_settings(trainer)),
                          "serving": dataclasses.asdict(line.serving_settings(model, instance_type))}
print(json.dumps({"line": line.LINE, "settings": out}))
"""


def _settings_from(python: str, tmp_path: Path) -> dict:
    result = subprocess.run([python, "-c", SETTINGS_SCRIPT, str(tmp_path / "source")], capture_output=True, text=True,
                            env={**os.environ, "PYTHONPATH": str(ROOT / "src")}, timeout=300, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.splitlines()[-1])


@needs_sdk
def test_both_sdk_lines_build_the_same_jobs_and_endpoints(tmp_path):
    other = os.environ.get(OTHER_PYTHON_ENV)
    if not other:
        pytest.skip(f"needs an interpreter with the other SDK line in ${OTHER_PYTHON_ENV} (CI: .venv-v2/bin/python)")
    ours, theirs = _settings_from(sys.executable, tmp_path / "a"), _settings_from(other, tmp_path / "a")
    assert {ours["line"], theirs["line"]} == {"v2", "v3"}
    for instance_type in ("local", "ml.m5.xlarge"):
        a, b = ours["settings"][instance_type], theirs["settings"][instance_type]
        assert a["serving"] == b["serving"], instance_type
        # Every training setting agrees, but where local mode writes: v3 writes under its container root.
        differ = {k for k in a["training"] if a["training"][k] != b["training"][k]}
        assert differ <= ({"output_path"} if instance_type == "local" else set()), (instance_type, differ)


# --- one clear sentence for each thing that is missing -------------------------------------------


@needs_sdk
def test_missing_docker_daemon_or_compose_is_one_sentence_each(monkeypatch, tmp_path):
    """Fake docker / docker-compose commands on PATH: each missing piece is its own sentence."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    monkeypatch.setenv("PATH", str(bin_dir))
    expected = {
        (): r"^SageMaker local mode needs Docker, which is not installed: install it .*local-process",
        (("docker", 1),): r"^SageMaker local mode needs a running Docker daemon, and none answers: start it",
        (("docker", 0),): r"^SageMaker local mode runs its containers through docker compose, which is not installed",
    }
    for fakes, message in expected.items():
        for path in bin_dir.iterdir():
            path.unlink()
        for name, status in fakes:
            (bin_dir / name).write_text(f"#!/bin/sh\n[ \"$1\" = compose ] && exit 1\nexit {status}\n")
            (bin_dir / name).chmod(0o755)
        with pytest.raises(CovidXrayError, match=message) as info:
            sdk_objects.make_session("local")
        assert "\n" not in str(info.value)
        assert sdk_objects.local_mode_problem() == str(info.value)  # what picks local-process as the default
    (bin_dir / "docker-compose").write_text("#!/bin/sh\nexit 0\n")
    (bin_dir / "docker-compose").chmod(0o755)
    assert jobs.docker_problem() is None
    assert sdk_objects.local_mode_problem() is None  # this fake docker says every image is here


@needs_sdk
def test_a_missing_local_mode_image_is_one_sentence(monkeypatch, tmp_path):
    """Docker answers, but has no image and no credentials to pull AWS's: say how to get one."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "docker").write_text('#!/bin/sh\n[ "$1" = image ] && exit 1\nexit 0\n')  # `docker image inspect` fails
    (bin_dir / "docker").chmod(0o755)
    monkeypatch.setenv("PATH", str(bin_dir))
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.delenv(sdk_objects.IMAGE_ENV, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    with pytest.raises(CovidXrayError, match=r"^no image for SageMaker local mode here: build one with 'make sagemaker-image'"):
        sdk_objects.local_mode_image(None, "local", sdk_objects.LOCAL_REGION)
    assert sdk_objects.local_mode_problem().startswith("no image for SageMaker local mode here")
    assert sdk_objects.local_mode_image("my/image:1", "local", sdk_objects.LOCAL_REGION) == "my/image:1"
    monkeypatch.setenv(sdk_objects.IMAGE_ENV, "my/image:2")
    assert sdk_objects.local_mode_image(None, "local", sdk_objects.LOCAL_REGION) == "my/image:2"


@needs_sdk
def test_missing_credentials_and_region_are_one_sentence_each(monkeypatch, tmp_path):
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE", "AWS_DEFAULT_REGION",
                 "AWS_REGION"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    with pytest.raises(CovidXrayError, match=r"^no AWS credentials found"):
        sdk_objects.make_session("ml.m5.xlarge", region="us-east-1")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAEXAMPLE")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "example")
    with pytest.raises(CovidXrayError, match=r"^no AWS region configured"):
        sdk_objects.make_session("ml.m5.xlarge")


@needs_sdk
def test_missing_role_is_one_sentence(sdk, offline_boto, source_dir, monkeypatch):
    monkeypatch.delenv(sdk_objects.ROLE_ENV, raising=False)

    def not_a_role(session):  # what the SDK says on a laptop, where the caller is a user, not a role
        raise ValueError("The current AWS identity is not a role")

    monkeypatch.setattr(sdk, "execution_role", not_a_role)
    session = sdk.session(offline_boto, local=False)
    with pytest.raises(CovidXrayError, match=r"^no SageMaker execution role: pass --role"):
        sdk_objects.training_settings("ml.m5.xlarge", source_dir=source_dir, session=session)
    monkeypatch.setenv(sdk_objects.ROLE_ENV, "arn:aws:iam::123456789012:role/FromEnv")
    assert sdk_objects.training_settings("ml.m5.xlarge", source_dir=source_dir, session=session).role.endswith("/FromEnv")


def test_missing_or_other_sdk_line_is_one_sentence(monkeypatch):
    monkeypatch.setattr(sdk_objects, "sdk_line", lambda: None)  # what an environment without the extra sees
    with pytest.raises(CovidXrayError, match=r"^the SageMaker Python SDK is not installed, not v3: "
                                             r"pip install 'covid-xray\[sagemaker\]'"):
        sdk_objects.make_session("ml.m5.xlarge")
    monkeypatch.setattr(sdk_objects, "sdk_line", lambda: "v3")
    with pytest.raises(CovidXrayError, match=r"^SDK v3 is installed, not v2: pip install 'covid-xray\[sagemaker-v2\]'"):
        sdk_objects.line_module("v2")


@needs_sdk
def test_cli_prints_the_sentence_not_a_traceback(monkeypatch, capsys, tmp_path):
    from covid_xray import cli

    monkeypatch.setattr(sdk_objects, "docker_problem", lambda: "SageMaker local mode needs Docker, which is not installed")
    train = tmp_path / "train"
    train.mkdir()
    status = cli.main(["sagemaker", "train", "--instance-type", "local", "--train", str(train),
                       "--job-dir", str(tmp_path), "--epochs", "1"])
    err = capsys.readouterr().err
    assert status == 2 and err.startswith("covid-xray: error: SageMaker local mode needs Docker") and err.count("\n") == 1
    other = {"v2": "v3", "v3": "v2"}[LINE]
    assert cli.main(["sagemaker", "train", "--instance-type", "ml.m5.xlarge", "--sdk", other, "--train", str(train),
                     "--job-dir", str(tmp_path)]) == 2
    assert f"is installed, not {other}" in capsys.readouterr().err
    assert cli.main(["sagemaker", "train", "--instance-type", "local-process", "--train", str(train),
                     "--job-dir", str(tmp_path), "--epoch", "1"]) == 2
    assert "unknown hyperparameter 'epoch'" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # free-form options are for `sagemaker train` only
        cli.main(["serve", "bundle", "--epochs", "1"])


# Stands in for `covid-xray sagemaker deploy` (its argv says so): on SIGTERM, as on Ctrl-C, it deletes "its
# endpoint" and exits.
FAKE_DEPLOY = """
import pathlib, signal, sys, time
signal.signal(signal.SIGTERM, signal.default_int_handler)
print("serving", flush=True)
try:
    time.sleep(600)
except KeyboardInterrupt:
    pathlib.Path(sys.argv[1]).write_text("deleted")
    sys.exit(130)
"""


def test_a_local_mode_endpoint_is_deleted_by_interrupting_its_deploy_command(tmp_path):
    marker = tmp_path / "deleted"
    deploy = subprocess.Popen([sys.executable, "-c", FAKE_DEPLOY, str(marker), "sagemaker", "deploy"],
                              stdout=subprocess.PIPE, text=True)
    bystander = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    try:
        assert deploy.stdout.readline() == "serving\n"
        described = {"kind": "local", "name": "covid-xray-x", "url": endpoints.LOCAL_MODE_URL, "pid": deploy.pid}
        endpoint = endpoints.endpoint_from_state(described)
        assert isinstance(endpoint, endpoints.LocalModeEndpoint) and endpoint.url == "http://localhost:8080"
        endpoint.delete_endpoint()
        assert deploy.wait(timeout=5) == 130 and marker.read_text() == "deleted"
        endpoint.delete_endpoint()  # already gone: nothing to do
        # A recorded pid that is no deploy command (recycled) is never signalled.
        endpoints.endpoint_from_state({**described, "pid": bystander.pid}).delete_endpoint()
        assert bystander.poll() is None
    finally:
        deploy.kill()
        bystander.kill()
    with pytest.raises(CovidXrayError, match="lives as long as the process that deployed it"):
        endpoints.endpoint_from_state({"kind": "local", "url": endpoints.LOCAL_MODE_URL}).delete_endpoint()


def test_the_image_make_builds_is_the_one_local_mode_looks_for():
    script = (ROOT / "docker" / "build-image.sh").read_text()

    def value(name: str) -> str:
        (line,) = [line for line in script.splitlines() if line.startswith(f"{name}=")]
        return line.split("=", 1)[1].split("#")[0].strip().removeprefix("${COVID_XRAY_IMAGE_REPO:-").rstrip("}")

    assert f"{value('REPO')}:{value('TORCH_VERSION')}-cpu-{value('PY_TAG')}" == sdk_objects.LOCAL_IMAGE
    # The torch the project allows at most (pyproject's ceiling), as the project's own environment gets it.
    assert f"torch>=2.4,<={value('TORCH_VERSION')}" in (ROOT / "pyproject.toml").read_text()


def test_local_gpu_runs_one_instance():
    with pytest.raises(CovidXrayError, match="local_gpu"):
        jobs.check_instance_type("local_gpu", 2)
    with pytest.raises(CovidXrayError, match="unknown instance type"):
        jobs.check_instance_type("m5.large")
