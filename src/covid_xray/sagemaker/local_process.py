"""`local-process`: a SageMaker training job emulated without Docker or the SDK. train.py runs in
subprocesses, one per simulated host, in an `/opt/ml`-like root with the environment variables AWS's
container would set; their logs are relayed as they come, and the model is tarred as SageMaker does."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import tarfile
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ..errors import CovidXrayError
from ..util import cpu_count
from . import entry
from .jobs import BASE_JOB_NAME, LOCAL_PROCESS, Log, TrainingJob, stage_source_dir

_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


def _job_name() -> str:
    return f"{BASE_JOB_NAME}-{time.strftime('%Y-%m-%d-%H-%M-%S')}-{int(time.time() * 1000) % 1000:03d}"


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
        "SM_NUM_CPUS": str(cpu_count()),
        "SM_HPS": json.dumps(dict(hyperparameters)),
        "SM_USER_ENTRY_POINT": "train.py",
        "SM_MASTER_ADDR": "127.0.0.1",  # the hosts are all this machine
        "SM_MASTER_PORT": str(free_port()),
    }
    if instance_count > 1:  # the simulated hosts share this machine's cores
        env.setdefault("OMP_NUM_THREADS", str(max(1, cpu_count() // instance_count)))
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


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
