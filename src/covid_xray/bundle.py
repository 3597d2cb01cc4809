"""The model bundle: a folder with model.safetensors and config.json (tar it for SageMaker).

No pickle on the load path; the weights' SHA-256 is recorded and verified, and a bundle is
written to a temporary folder and renamed into place, so a crash never leaves half a bundle.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

from .errors import ModelError

FORMAT_VERSION = 1
WEIGHTS = "model.safetensors"
CONFIG = "config.json"


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
        raise ModelError(f"{path} has bundle format {config.get('format_version')!r}; this version reads {FORMAT_VERSION}")
    return config


def verify_file(bundle: Path, name: str, config: dict[str, Any]) -> Path:
    """Return the path of a bundle file after checking it against the SHA-256 in config.json."""
    file = bundle / name
    if not file.is_file():
        raise ModelError(f"{file} is missing; the bundle is incomplete")
    expected = config.get("files", {}).get(name)
    if expected and sha256_file(file) != expected:
        raise ModelError(f"{file} does not match the checksum in {CONFIG}: the file is truncated or was modified")
    return file


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
