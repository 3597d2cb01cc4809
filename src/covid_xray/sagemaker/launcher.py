"""Train, deploy, predict and clean up — on managed SageMaker, in SageMaker local mode, or with
no Docker and no AWS account at all.

Instance types:
- `ml.*`: managed SageMaker (AWS credentials and an execution role needed).
- `local`, `local_gpu`: SageMaker local mode, AWS's containers under Docker.
- `local-process` (the default when Docker is missing): the same entry point in subprocesses with
  the environment variables and `/opt/ml`-style layout the container would give it, the model
  tarred like SageMaker does, then served by `covid-xray serve` on a free loopback port.

The SageMaker Python SDK is imported only for `local`, `local_gpu` and `ml.*`, so
`local-process` needs neither the SDK nor Docker.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

from ..errors import CovidXrayError
from . import entry

LOCAL_PROCESS = "local-process"
LOCAL_MODES = ("local", "local_gpu")
# The newest PyTorch release with both a training and an inference container in SDK 2.x
# (image_uri_config/pytorch.json); the same pair serves the model that the job produced.
FRAMEWORK_VERSION = "2.6.0"
PY_VERSION = "py312"
BASE_JOB_NAME = "covid-xray"
STATE_FILE = "sagemaker.json"
ROLE_ENV = "SAGEMAKER_ROLE"
# Local mode never checks the role, but the SDK wants one; AWS's local-mode examples pass a dummy.
LOCAL_ROLE = "arn:aws:iam::111111111111:role/service-role/AmazonSageMaker-ExecutionRole-local"
# Where SageMaker local mode serves an endpoint (the SDK's default local.serving_port).
LOCAL_MODE_URL = "http://localhost:8080"
LOCAL_CODE_LOCATION = "s3://covid-xray-local-mode/code"  # never written to: see build_model
# Any image type is fine: the endpoint sniffs the bytes, exactly as for image/jpeg or image/png.
IMAGE_CONTENT_TYPE = "application/x-image"
SERVING_ENV = {"SAGEMAKER_PROGRAM": "inference.py", "SAGEMAKER_SUBMIT_DIRECTORY": "/opt/ml/model/code"}

Log = Callable[[str], None]
_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


# --- what a job and an endpoint are ---------------------------------------------------------


@dataclass
class TrainingJob:
    """A finished training job: where its model.tar.gz is and what it reported."""

    name: str
    instance_type: str
    model_data: str  # a local path (local-process, local mode) or an s3:// URI
    output_dir: str | None = None  # reports, plots, metrics.json, when they are on this machine
    metrics: dict[str, float] = field(default_factory=dict)
    region: str | None = None


class Endpoint(Protocol):
    """What every endpoint here offers, like the SDK's Predictor: `predict` answers with the
    endpoint's JSON (`predictions`, one per image, and `model`)."""

    def predict(self, image: bytes) -> dict[str, Any]: ...

    def delete_endpoint(self) -> None: ...


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


# --- environment checks: one sentence each, never an SDK traceback ----------------------------


def docker_available() -> bool:
    if not shutil.which("docker"):
        return False
    try:
        return subprocess.run(["docker", "info"], check=False, capture_output=True, timeout=20).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def default_instance_type() -> str:
    return "local" if docker_available() else LOCAL_PROCESS


def check_instance_type(instance_type: str, instance_count: int = 1) -> None:
    if instance_type not in (LOCAL_PROCESS, *LOCAL_MODES) and not instance_type.startswith("ml."):
        raise CovidXrayError(f"unknown instance type {instance_type!r}: use local-process, local, local_gpu or an ml.* type")
    if instance_count < 1:
        raise CovidXrayError("instance count must be at least 1")
    if instance_type == "local_gpu" and instance_count > 1:
        raise CovidXrayError("SageMaker local mode runs one GPU instance: use --instance-count 1 with local_gpu")


def _sdk():
    """Import the SageMaker SDK quietly (it logs config lookups and a v3 notice on import)."""
    os.environ.setdefault("SAGEMAKER_SUPPRESS_V2_WARNING", "1")
    logging.getLogger("sagemaker.config").setLevel(logging.WARNING)
    try:
        import sagemaker
        import sagemaker.local
        import sagemaker.pytorch
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


# --- train -------------------------------------------------------------------------------------


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


def _job_name() -> str:
    return f"{BASE_JOB_NAME}-{time.strftime('%Y-%m-%d-%H-%M-%S')}-{int(time.time() * 1000) % 1000:03d}"


def train(
    inputs: Mapping[str, str | os.PathLike] | str | os.PathLike,
    *,
    instance_type: str | None = None,
    instance_count: int = 1,
    hyperparameters: Mapping[str, Any] | None = None,
    out: str | os.PathLike = "runs/sagemaker",
    role: str | None = None,
    region: str | None = None,
    log: Log = print,
) -> TrainingJob:
    """Run the training job. `inputs` is a dataset folder (see `channels`) or a channel → path/URI
    mapping. Everything local (source, model, reports, the job record) goes under `out`."""
    instance_type = instance_type or default_instance_type()
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
        job = _run_sdk_job(inputs, hyperparameters, instance_type, instance_count, out, role, region, log)
    save_state(out, job=asdict(job), endpoint=None)
    return job


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
    from ..evaluation import summary_lines

    test = json.loads((output_dir / "metrics.json").read_text())["test"]
    return entry.scrape_metrics(summary_lines(test, "test"), entry.metric_definitions(list(test["per_class"])))


def _channel_uri(value: str, name: str, session, local: bool, log: Log) -> str:
    """Local mode reads file:// URIs; managed SageMaker reads S3, so local folders are uploaded."""
    if value.startswith(("s3://", "file://")):
        return value
    path = Path(value).resolve()
    if local:
        return f"file://{path}"
    log(f"uploading {path} to S3 (channel {name})")
    return session.upload_data(str(path), key_prefix=f"{BASE_JOB_NAME}/data/{name}")


def run_local_process(
    inputs: Mapping[str, str],
    hyperparameters: Mapping[str, Any],
    *,
    out: Path,
    instance_count: int = 1,
    log: Log = print,
) -> TrainingJob:
    """Run train.py as AWS's container would, in subprocesses: one per simulated host, each
    under torchrun when instance_count > 1 (what `torch_distributed` makes the toolkit do).
    The hosts share one root, which is fine because only rank 0 writes."""
    name = _job_name()
    root = out / name
    code, model, output = _lay_out_root(root, inputs, hyperparameters)
    hosts = [f"algo-{i}" for i in range(1, instance_count + 1)]
    env = {
        **os.environ,
        "PYTHONPATH": str(code),  # the staged copy of covid_xray runs, as in the container
        "SM_MODEL_DIR": str(model),
        "SM_OUTPUT_DATA_DIR": str(output / "data"),
        "SM_OUTPUT_DIR": str(output),
        "SM_INPUT_DIR": str(root / "input"),
        "SM_CHANNELS": json.dumps(sorted(inputs)),
        **{f"SM_CHANNEL_{channel.upper()}": str(root / "input" / "data" / channel) for channel in inputs},
        "SM_HOSTS": json.dumps(hosts),
        "SM_NUM_CPUS": str(os.cpu_count() or 1),
        "SM_HPS": json.dumps(dict(hyperparameters)),
        "SM_USER_ENTRY_POINT": "train.py",
        "SM_MASTER_ADDR": "127.0.0.1",  # the hosts are all this machine
        "SM_MASTER_PORT": str(free_port()),
    }
    if instance_count > 1:  # the simulated hosts share this machine's cores
        env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // instance_count)))
    args = entry.hyperparameter_args(hyperparameters)
    log(f"training job {name}: {instance_count} × local-process, root {root}")
    procs: dict[str, subprocess.Popen] = {}
    for host, gpus in zip(hosts, _share_gpus(instance_count)):
        host_env = {**env, "SM_CURRENT_HOST": host, "SM_NUM_GPUS": str(len(gpus))}
        if instance_count > 1:
            host_env["CUDA_VISIBLE_DEVICES"] = ",".join(gpus)
        sm_env = entry.SageMakerEnv.from_environ(host_env)
        if instance_count > 1:
            cmd = entry.torchrun_command(sm_env, ["train.py"], args)
        else:
            cmd = [sys.executable, "train.py", *args]
        procs[host] = subprocess.Popen(
            cmd, cwd=code, env=host_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
    lines = _stream(procs, log, prefix=instance_count > 1)
    failed = [(host, p.returncode) for host, p in procs.items() if p.returncode != 0]
    if failed:
        host, status = failed[0]
        raise CovidXrayError(f"training job {name} failed on {host} with exit status {status}: its log above says why")

    config = json.loads((model / "config.json").read_text())
    return TrainingJob(
        name=name, instance_type=LOCAL_PROCESS, model_data=str(_tar_model(model, output / "model.tar.gz")),
        output_dir=str(output / "data"),
        metrics=entry.scrape_metrics(lines[hosts[0]], entry.metric_definitions(config["classes"])),
    )


def _lay_out_root(
    root: Path, inputs: Mapping[str, str], hyperparameters: Mapping[str, Any]
) -> tuple[Path, Path, Path]:
    """/opt/ml under root: code/ (the staged source_dir), input/data/<channel> (links to the data,
    which SageMaker would have downloaded), input/config/hyperparameters.json, model/, output/data/."""
    code = stage_source_dir(root / "code")
    data = root / "input" / "data"
    data.mkdir(parents=True)
    for channel, source in inputs.items():
        if source.startswith("s3://"):
            raise CovidXrayError(f"local-process reads local folders, not {source}: download the data first")
        path = Path(source.removeprefix("file://")).expanduser().resolve()
        if not path.exists():
            raise CovidXrayError(f"channel {channel}: {path} does not exist")
        (data / channel).symlink_to(path, target_is_directory=path.is_dir())
    (root / "input" / "config").mkdir()
    as_strings = {name: str(value) for name, value in hyperparameters.items()}  # as SageMaker writes them
    (root / "input" / "config" / "hyperparameters.json").write_text(json.dumps(as_strings))
    (root / "model").mkdir()
    (root / "output" / "data").mkdir(parents=True)
    return code, root / "model", root / "output"


def _stream(procs: Mapping[str, subprocess.Popen], log: Log, *, prefix: bool) -> dict[str, list[str]]:
    """Relay every host's output as it comes (prefixed by host when there are several, like
    SageMaker's logs), and keep it for the metrics. Returns once all have exited."""
    lines: dict[str, list[str]] = {host: [] for host in procs}

    def pump(host: str, proc: subprocess.Popen) -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            line = line.rstrip("\n")
            lines[host].append(line)
            if _ANSI.sub("", line).strip():  # progress bars redraw with cursor codes: skip the empty redraws
                log(f"{host} | {line}" if prefix else line)

    threads = [threading.Thread(target=pump, args=item, daemon=True) for item in procs.items()]
    for t in threads:
        t.start()
    try:
        for proc in procs.values():
            proc.wait()
    finally:  # interrupted: stop every host we started, not only the first
        for proc in procs.values():
            if proc.poll() is None:
                proc.terminate()
                proc.wait()
    for t in threads:
        t.join()
    return lines


def _share_gpus(hosts: int) -> list[list[str]]:
    """This machine's GPUs split evenly between the simulated hosts (none each when there are
    fewer GPUs than hosts: then they train on CPU), so no two hosts' processes share a GPU."""
    import torch

    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    ids = visible.split(",") if visible else [str(i) for i in range(torch.cuda.device_count())]
    per_host = len(ids) // hosts
    return [ids[i * per_host : (i + 1) * per_host] for i in range(hosts)]


def _tar_model(model_dir: Path, target: Path) -> Path:
    """model.tar.gz as SageMaker makes it: the folder's contents at the top level of the archive."""
    with tarfile.open(target, "w:gz") as tar:
        for item in sorted(model_dir.iterdir()):
            tar.add(item, arcname=item.name)
    return target


def _extract(archive: Path, dest: Path) -> Path:
    shutil.rmtree(dest, ignore_errors=True)
    dest.mkdir(parents=True)
    with tarfile.open(archive) as tar:
        tar.extractall(dest, filter="data")  # refuses absolute paths, links out of dest, devices
    return dest


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --- deploy, predict, clean up -------------------------------------------------------------------


class LocalProcessEndpoint:
    """`covid-xray serve` on a loopback port, serving model.tar.gz unpacked as SageMaker would."""

    def __init__(self, url: str, pid: int, model_dir: str, proc: subprocess.Popen | None = None):
        self.url, self.pid, self.model_dir = url, pid, model_dir
        self._proc = proc  # set in the process that started the server

    @classmethod
    def start(cls, model_data: str | os.PathLike, workdir: str | os.PathLike, *, port: int | None = None,
              timeout_s: float = 180) -> LocalProcessEndpoint:
        workdir = Path(workdir).resolve()
        model_dir = _extract(Path(model_data), workdir / "model")
        port = port or free_port()
        with open(workdir / "serve.log", "wb") as log_file:  # the server keeps its own copy of the descriptor
            proc = subprocess.Popen(
                [sys.executable, "-m", "covid_xray.cli", "serve", str(model_dir),
                 "--host", "127.0.0.1", "--port", str(port)],
                stdout=log_file, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONPATH": entry.child_pythonpath()},
                start_new_session=True,  # outlives the `deploy` command; `cleanup` stops it
            )
        endpoint = cls(f"http://127.0.0.1:{port}", proc.pid, str(model_dir), proc)
        endpoint._wait_ready(timeout_s, workdir / "serve.log")
        return endpoint

    def _wait_ready(self, timeout_s: float, log_path: Path) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self._proc is not None and self._proc.poll() is not None:
                tail = log_path.read_text(errors="replace").strip().splitlines()[-5:]
                raise CovidXrayError(f"the endpoint exited while starting (status {self._proc.returncode}): " + " / ".join(tail))
            try:
                with urllib.request.urlopen(f"{self.url}/ping", timeout=2) as response:
                    if response.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.25)
        self.delete_endpoint()
        raise CovidXrayError(f"the endpoint did not answer /ping within {timeout_s:.0f} s; see {log_path}")

    def predict(self, image: bytes, content_type: str = IMAGE_CONTENT_TYPE) -> dict[str, Any]:
        return http_invoke(self.url, image, content_type)

    def delete_endpoint(self) -> None:
        """Stop the server (SIGTERM, then SIGKILL after 20 s); a no-op when it is already gone."""
        for sig, grace_s in ((signal.SIGTERM, 20), (signal.SIGKILL, 5)):
            if not self._running():
                return
            os.kill(self.pid, sig)
            deadline = time.monotonic() + grace_s
            while self._running() and time.monotonic() < deadline:
                time.sleep(0.1)

    def _running(self) -> bool:
        if self._proc is not None:  # our child: poll() also reaps it
            return self._proc.poll() is None
        return _serves(self.pid, self.model_dir)

    def describe(self) -> dict[str, Any]:
        return {"kind": LOCAL_PROCESS, "url": self.url, "pid": self.pid, "model_dir": self.model_dir}


def _serves(pid: int, model_dir: str) -> bool:
    """Whether pid is a live server of this very model folder, so that a recycled pid is never
    signalled. Without /proc (macOS), whether the pid exists at all."""
    if Path("/proc/self").exists():
        try:
            return model_dir in Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
        except OSError:
            return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


class SageMakerEndpoint:
    """A SageMaker (local mode or managed) endpoint behind the SDK's Predictor."""

    def __init__(self, predictor, instance_type: str):
        self.predictor, self.instance_type = predictor, instance_type

    def predict(self, image: bytes) -> dict[str, Any]:
        return self.predictor.predict(image)

    def delete_endpoint(self) -> None:
        self.predictor.delete_model()
        self.predictor.delete_endpoint()

    def describe(self) -> dict[str, Any]:
        described = {"kind": self.instance_type, "name": self.predictor.endpoint_name,
                     "region": self.predictor.sagemaker_session.boto_region_name}
        return described | ({"url": LOCAL_MODE_URL} if self.instance_type in LOCAL_MODES else {})


def _sdk_predictor(endpoint_name: str, session):
    sagemaker = _sdk()
    from sagemaker.deserializers import JSONDeserializer
    from sagemaker.serializers import IdentitySerializer

    return sagemaker.predictor.Predictor(
        endpoint_name, sagemaker_session=session,
        serializer=IdentitySerializer(IMAGE_CONTENT_TYPE), deserializer=JSONDeserializer(),
    )


def deploy(
    job: TrainingJob | str | os.PathLike,
    *,
    instance_type: str | None = None,
    workdir: str | os.PathLike | None = None,
    role: str | None = None,
    region: str | None = None,
    port: int | None = None,
) -> LocalProcessEndpoint | SageMakerEndpoint:
    """Serve a job's model.tar.gz (or one given by path/URI). The endpoint type defaults to the
    job's instance type (local-process for a bare path)."""
    model_data = job.model_data if isinstance(job, TrainingJob) else str(job)
    instance_type = instance_type or (job.instance_type if isinstance(job, TrainingJob) else LOCAL_PROCESS)
    check_instance_type(instance_type)
    if instance_type == LOCAL_PROCESS:
        if model_data.startswith("s3://"):
            raise CovidXrayError(f"local-process serves a local model.tar.gz, not {model_data}: download it first")
        workdir = Path(workdir or Path(model_data).resolve().parent / "endpoint")
        workdir.mkdir(parents=True, exist_ok=True)
        return LocalProcessEndpoint.start(model_data, workdir, port=port)
    session = make_session(instance_type, region or (job.region if isinstance(job, TrainingJob) else None))
    if instance_type in LOCAL_MODES and not model_data.startswith("file://"):
        model_data = f"file://{Path(model_data).resolve()}"
    model = build_model(instance_type, model_data, role=role, session=session)
    model.deploy(initial_instance_count=1, instance_type=instance_type)
    return SageMakerEndpoint(_sdk_predictor(model.endpoint_name, session), instance_type)


def http_invoke(
    url: str, image: bytes, content_type: str = IMAGE_CONTENT_TYPE, timeout_s: float = 120
) -> dict[str, Any]:
    """POST /invocations, as SageMaker's runtime does; an error response becomes one sentence."""
    request = urllib.request.Request(f"{url}/invocations", data=image, method="POST",
                                     headers={"Content-Type": content_type, "Accept": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as response:
            return json.loads(response.read())
    except urllib.error.HTTPError as e:
        detail = e.read().decode(errors="replace")
        try:
            detail = json.loads(detail).get("error", detail)
        except (json.JSONDecodeError, AttributeError):
            pass
        raise CovidXrayError(f"the endpoint refused the request ({e.code}): {detail}") from None
    except (urllib.error.URLError, OSError) as e:
        raise CovidXrayError(f"no endpoint answering at {url} ({getattr(e, 'reason', e)}): deploy it first") from None


class LocalModeEndpoint:
    """A local-mode endpoint seen from another process: reachable over HTTP, but owned (and
    deleted) by the process that deployed it."""

    def __init__(self, url: str = LOCAL_MODE_URL):
        self.url = url

    def predict(self, image: bytes) -> dict[str, Any]:
        return http_invoke(self.url, image)

    def delete_endpoint(self) -> None:
        raise CovidXrayError("a local-mode endpoint lives as long as the 'deploy' command serving it: press Ctrl-C there")


def endpoint_from_state(described: Mapping[str, Any]) -> Endpoint:
    """The endpoint that `deploy` recorded (`describe()`), from another process."""
    kind = described["kind"]
    if kind == LOCAL_PROCESS:
        return LocalProcessEndpoint(described["url"], described["pid"], described["model_dir"])
    if kind in LOCAL_MODES:
        return LocalModeEndpoint(described["url"])
    return SageMakerEndpoint(_sdk_predictor(described["name"], make_session(kind, described.get("region"))), kind)


def recorded_endpoint(job_dir: str | os.PathLike) -> Endpoint | None:
    described = load_state(job_dir).get("endpoint")
    return endpoint_from_state(described) if described else None
