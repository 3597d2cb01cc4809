"""The model bundle: a folder with model.safetensors and config.json (tar it for SageMaker).

No pickle on the load path; the weights' SHA-256 is recorded and verified, and a bundle is
written to a temporary folder and renamed into place, so a crash never leaves half a bundle.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from .config import TrainConfig
from .errors import ModelError
from .util import atomic_write

FORMAT_VERSION = 1
WEIGHTS = "model.safetensors"
CONFIG = "config.json"
# Optional, written by `covid-xray export`: the same model as ONNX graphs (fp32, and int8-quantised).
ONNX = "model.onnx"
ONNX_INT8 = "model.int8.onnx"


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


INPUT = "grayscale uint8, N×1×H×W; normalisation inside the model"


@dataclass
class BundleConfig:
    """config.json: what a bundle is and how it was made. Training writes it; inference, export and
    evaluation read it. Entries a bundle may lack (hand-made or minimal bundles) take neutral defaults."""

    backbone: str
    classes: list[str]
    input_size: int
    normalization: dict[str, list[float]]
    hyperparameters: TrainConfig = field(default_factory=TrainConfig)
    training: dict[str, Any] = field(default_factory=dict)  # best epoch, epochs run, seconds, processes
    data: dict[str, Any] = field(default_factory=dict)  # layout, sources, counts, audit summary, fingerprint
    metrics: dict[str, Any] = field(default_factory=dict)  # summary of metrics.json per split
    calibration: dict[str, Any] = field(default_factory=dict)  # temperature, fitted_on
    ood: dict[str, Any] | None = None  # the guard's settings (ood.OODGuard.config)
    referral: dict[str, Any] = field(default_factory=dict)  # threshold, target sensitivity, rule
    site_reference: dict[str, Any] | None = None  # what validation predicts for a site (site_shift.Reference)
    onnx: dict[str, Any] = field(default_factory=dict)  # what `export` recorded: parity, int8 margin
    files: dict[str, str] = field(default_factory=dict)  # name → SHA-256
    input: str = INPUT
    format_version: int = FORMAT_VERSION
    package_version: str | None = None

    @property
    def temperature(self) -> float:
        return float(self.calibration.get("temperature", 1.0))

    @property
    def referral_threshold(self) -> float:
        return float(self.referral.get("threshold", 0.0))

    def to_dict(self) -> dict[str, Any]:
        document = {f.name: getattr(self, f.name) for f in fields(self)}
        document["hyperparameters"] = self.hyperparameters.to_dict()
        # The order a reader sees: what the bundle is, then how it was made, then its files.
        first = ("format_version", "package_version", "backbone", "classes", "input_size", "input", "normalization")
        return {**{k: document.pop(k) for k in first}, **{k: v for k, v in document.items() if k != "files"},
                "files": document["files"]}

    @classmethod
    def from_dict(cls, document: dict[str, Any], where: str | os.PathLike = "the bundle") -> BundleConfig:
        if document.get("format_version") != FORMAT_VERSION:
            raise ModelError(f"{where} has bundle format {document.get('format_version')!r}, this version reads "
                             f"{FORMAT_VERSION}: retrain with this version, or use the covid-xray version that wrote it")
        known = {f.name for f in fields(cls)}
        values = {k: v for k, v in document.items() if k in known}
        missing = [name for name in ("backbone", "classes", "input_size", "normalization") if name not in values]
        if missing:
            raise ModelError(f"{where}/{CONFIG} lacks {', '.join(missing)}; the bundle is damaged")
        values["hyperparameters"] = TrainConfig.from_dict(values.get("hyperparameters") or {})
        return cls(**values)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)


def save_bundle(path: str | os.PathLike, model, config: BundleConfig, files: dict[str, str | bytes] | None = None) -> Path:
    """Write weights + config (+ extra files such as MODEL_CARD.md) atomically to `path`."""
    from safetensors.torch import save_file

    from . import __version__

    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(state, tmp / WEIGHTS)
    for name, content in (files or {}).items():
        (tmp / name).parent.mkdir(parents=True, exist_ok=True)
        mode = "wb" if isinstance(content, bytes) else "w"
        with open(tmp / name, mode) as f:
            f.write(content)
    config = replace(config, format_version=FORMAT_VERSION, package_version=__version__,
                     files={name: sha256_file(tmp / name) for name in [WEIGHTS, *(files or {})]})
    (tmp / CONFIG).write_text(config.to_json())
    if path.exists():
        old = path.with_name(f".{path.name}.old-{os.getpid()}")
        path.rename(old)
        tmp.rename(path)
        shutil.rmtree(old)
    else:
        tmp.rename(path)
    return path


def read_config(path: str | os.PathLike) -> BundleConfig:
    path = Path(path)
    if not (path / CONFIG).is_file():
        raise ModelError(f"{path} is not a model bundle (no {CONFIG}); pass the folder written by 'covid-xray train'")
    try:
        document = json.loads((path / CONFIG).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ModelError(f"{path / CONFIG} is not valid JSON ({e}); the bundle is damaged") from None
    if not isinstance(document, dict):
        raise ModelError(f"{path / CONFIG} is not a JSON object; the bundle is damaged")
    return BundleConfig.from_dict(document, path)


def verify_file(bundle: Path, name: str, config: BundleConfig, *, recorded: bool = False) -> Path:
    """Return the path of a bundle file after checking it against the SHA-256 in config.json.

    recorded=True refuses a file that config.json does not list (files added after the bundle was
    written, such as model.onnx, count only once their checksum is recorded)."""
    file = bundle / name
    if not file.is_file():
        raise ModelError(f"{file} is missing; the bundle is incomplete")
    expected = config.files.get(name)
    if recorded and not expected:
        raise ModelError(f"{file} has no checksum in {CONFIG}; it was not written by covid-xray, export again")
    if expected and sha256_file(file) != expected:
        raise ModelError(f"{file} does not match the checksum in {CONFIG}: the file is truncated or was modified")
    return file


def add_files(path: str | os.PathLike, files: dict[str, Path], onnx: dict[str, Any]) -> BundleConfig:
    """Move finished files (e.g. model.onnx) into an existing bundle and record their SHA-256 and `onnx`
    (what the export measured) in config.json. The config is replaced last and atomically, so an interrupted
    call leaves files that load refuses (unrecorded or mismatched checksum), never a silently wrong one."""
    path = Path(path)
    config = read_config(path)
    checksums = {name: sha256_file(src) for name, src in files.items()}
    for name, src in files.items():
        os.replace(src, path / name)
    config = replace(config, onnx=onnx, files={**config.files, **checksums})
    atomic_write(path / CONFIG, config.to_json())
    return config


def load_bundle(path: str | os.PathLike):
    """Return (model in eval mode, config). Verifies the weights' checksum before reading them."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from .models import create_model

    path = Path(path)
    config = read_config(path)
    weights = verify_file(path, WEIGHTS, config)
    model = create_model(config.backbone, len(config.classes), weights="none")
    try:
        model.load_state_dict(load_file(weights))
    except (SafetensorError, RuntimeError) as e:
        raise ModelError(f"{weights} does not fit {config.backbone} ({str(e).splitlines()[0]})") from None
    return model.eval(), config
