"""The model bundle: a folder with model.safetensors and config.json (tar it for SageMaker).

No pickle on the load path; the weights' SHA-256 is recorded and verified, and a bundle is
written to a temporary folder and renamed into place, so a crash never leaves half a bundle.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .errors import ModelError

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


def save_bundle(path: str | os.PathLike, model, config: dict[str, Any], files: dict[str, str | bytes] | None = None) -> Path:
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
    config = {
        "format_version": FORMAT_VERSION,
        "package_version": __version__,
        **config,
        "files": {name: sha256_file(tmp / name) for name in [WEIGHTS, *(files or {})]},
    }
    (tmp / CONFIG).write_text(json.dumps(config, indent=2))
    if path.exists():
        old = path.with_name(f".{path.name}.old-{os.getpid()}")
        path.rename(old)
        tmp.rename(path)
        shutil.rmtree(old)
    else:
        tmp.rename(path)
    return path


def read_config(path: str | os.PathLike) -> dict[str, Any]:
    path = Path(path)
    if not (path / CONFIG).is_file():
        raise ModelError(f"{path} is not a model bundle (no {CONFIG}); pass the folder written by 'covid-xray train'")
    try:
        config = json.loads((path / CONFIG).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ModelError(f"{path / CONFIG} is not valid JSON ({e}); the bundle is damaged") from None
    if config.get("format_version") != FORMAT_VERSION:
        raise ModelError(f"{path} has bundle format {config.get('format_version')!r}, this version reads "
                         f"{FORMAT_VERSION}: retrain with this version, or use the covid-xray version that wrote it")
    return config


def verify_file(bundle: Path, name: str, config: dict[str, Any], *, recorded: bool = False) -> Path:
    """Return the path of a bundle file after checking it against the SHA-256 in config.json.

    recorded=True refuses a file that config.json does not list (files added after the bundle was
    written, such as model.onnx, count only once their checksum is recorded)."""
    file = bundle / name
    if not file.is_file():
        raise ModelError(f"{file} is missing; the bundle is incomplete")
    expected = config.get("files", {}).get(name)
    if recorded and not expected:
        raise ModelError(f"{file} has no checksum in {CONFIG}; it was not written by covid-xray, export again")
    if expected and sha256_file(file) != expected:
        raise ModelError(f"{file} does not match the checksum in {CONFIG}: the file is truncated or was modified")
    return file


def add_files(path: str | os.PathLike, files: dict[str, Path], updates: dict[str, Any]) -> dict[str, Any]:
    """Move finished files (e.g. model.onnx) into an existing bundle and record their SHA-256 and
    `updates` in config.json. The config is replaced last and atomically, so an interrupted call
    leaves files that load refuses (unrecorded or mismatched checksum), never a silently wrong one."""
    path = Path(path)
    config = read_config(path)
    checksums = {name: sha256_file(src) for name, src in files.items()}
    for name, src in files.items():
        os.replace(src, path / name)
    config = {**config, **updates, "files": {**config.get("files", {}), **checksums}}
    tmp = path / f".{CONFIG}.tmp-{os.getpid()}"
    tmp.write_text(json.dumps(config, indent=2))
    os.replace(tmp, path / CONFIG)
    return config


def bundle_dataset(config: dict[str, Any], data: str | os.PathLike | Sequence[str | os.PathLike] | None):
    """The dataset split exactly as it was when this bundle was trained (same fractions, split seed,
    sources and held-out source), so "test" means the same images; refuses data whose classes or
    sources differ from the bundle's. `data`: `--data` value(s), NAME=PATH or PATH each."""
    from .data import discover, parse_sources

    hp = config.get("hyperparameters", {})
    sources = parse_sources(data)
    trained = list(config.get("data", {}).get("sources", {}))
    if len(trained) > 1 and sorted(trained) != sorted(s.name for s in sources):
        raise ModelError(f"the bundle was trained on sources {', '.join(trained)}; pass each again as --data NAME=PATH "
                         f"(got {', '.join(s.name for s in sources)})")
    dataset = discover(
        sources, val_fraction=hp.get("val_fraction", 0.15), test_fraction=hp.get("test_fraction", 0.2),
        split_seed=hp.get("split_seed", 0), holdout=hp.get("holdout_source"),
    )
    if dataset.classes != config["classes"]:
        raise ModelError(f"the data's classes {dataset.classes} differ from the bundle's {config['classes']}; "
                         f"use the data the model was trained on (--data)")
    return dataset


def load_bundle(path: str | os.PathLike):
    """Return (model in eval mode, config). Verifies the weights' checksum before reading them."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from .models import create_model

    path = Path(path)
    config = read_config(path)
    weights = verify_file(path, WEIGHTS, config)
    model = create_model(config["backbone"], len(config["classes"]), weights="none")
    try:
        model.load_state_dict(load_file(weights))
    except (SafetensorError, RuntimeError) as e:
        raise ModelError(f"{weights} does not fit {config['backbone']} ({str(e).splitlines()[0]})") from None
    return model.eval(), config
