"""`Predictor`: image files or bytes → the same preprocessing as training → class probabilities.

The CLI, the server and the SageMaker handlers all predict through this class. Probabilities come
from PyTorch or, when the bundle has an exported graph (`covid-xray export`), from ONNX Runtime on
CPU; `backend` chooses, `auto` prefers the fp32 ONNX graph. ONNX Runtime and PyTorch are imported
only when used, so a command that predicts with ONNX never pays for importing torch.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Any

import numpy as np

from .bundle import ONNX, ONNX_INT8, read_config, verify_file
from .data import load_image
from .errors import ModelError

BACKENDS = ("auto", "torch", "onnx", "onnx-int8")
# Lets `serve` and the SageMaker handlers, which load a bundle without options, pick a backend.
BACKEND_ENV = "COVID_XRAY_BACKEND"


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits.astype(np.float64)
    z = np.exp(z - z.max(axis=1, keepdims=True))
    return (z / z.sum(axis=1, keepdims=True)).astype(np.float32)


def cpu_count() -> int:
    """Cores this process may run on (a container or taskset can allow fewer than the machine has)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def onnx_session(path: Path):
    import onnxruntime as ort

    options = ort.SessionOptions()
    # One request at a time uses every allowed core; a second (inter-op) pool would only compete with it.
    options.intra_op_num_threads = cpu_count()
    options.inter_op_num_threads = 1
    # Idle workers sleep instead of spinning: when anything else wants a core (the server's decode
    # threads, another process), spinning workers halved throughput on 2 cores; sleeping costs
    # little on an idle machine.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3  # warnings about unused initialisers etc. are noise to a user
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


class OnnxModel:
    """Class probabilities from an exported graph. With a `fallback`, images whose top-2 margin is
    below `margin` are re-scored by it: int8 error can flip only near-ties, and those are few."""

    def __init__(self, path: Path, fallback: OnnxModel | None = None, margin: float = 0.0):
        self.session = onnx_session(path)
        self.input = self.session.get_inputs()[0].name
        self.n_classes = int(self.session.get_outputs()[0].shape[1])
        self.fallback, self.margin = fallback, margin

    def __call__(self, images: np.ndarray, batch_size: int = 32) -> np.ndarray:
        if not len(images):
            return np.zeros((0, self.n_classes), np.float32)
        logits = [self.session.run(None, {self.input: images[i : i + batch_size, None]})[0]
                  for i in range(0, len(images), batch_size)]
        probs = softmax(np.concatenate(logits))
        if self.fallback is not None:
            top2 = np.sort(probs, axis=1)[:, -2:]
            near = top2[:, 1] - top2[:, 0] < self.margin
            if near.any():
                probs[near] = self.fallback(images[near], batch_size)
        return probs


def resolve_backend(requested: str | None, config: dict[str, Any], bundle: Path) -> str:
    """The backend to use: the one asked for (checked), or for `auto` ONNX when exported and installed."""
    requested = requested or os.environ.get(BACKEND_ENV) or "auto"
    if requested not in BACKENDS:
        raise ModelError(f"unknown backend {requested!r}; choose one of {', '.join(BACKENDS)}")
    exported = config.get("files", {})
    has_ort = importlib.util.find_spec("onnxruntime") is not None
    if requested == "auto":
        return "onnx" if ONNX in exported and has_ort else "torch"
    if requested == "torch":
        return requested
    needed, flags = (ONNX_INT8, "--onnx --int8") if requested == "onnx-int8" else (ONNX, "--onnx")
    if needed not in exported:
        raise ModelError(f"{bundle} has no {needed}; run 'covid-xray export {bundle} {flags}' first, or use --backend torch")
    if not has_ort:
        raise ModelError("ONNX Runtime is not installed: pip install 'covid-xray[onnx]', or use --backend torch")
    return requested


class Predictor:
    def __init__(self, model, config: dict[str, Any], onnx: OnnxModel | None = None,
                 bundle: Path | None = None, backend: str = "torch"):
        self._model = model
        self.config = config
        self.classes: list[str] = list(config["classes"])
        self.size: int = int(config["input_size"])
        self.onnx = onnx
        self.bundle = bundle
        self.backend = backend

    @classmethod
    def from_bundle(cls, path: str | os.PathLike, backend: str | None = None) -> Predictor:
        """backend: auto | torch | onnx | onnx-int8 (default: $COVID_XRAY_BACKEND, else auto)."""
        path = Path(path)
        config = read_config(path)
        backend = resolve_backend(backend, config, path)
        if backend == "torch":
            from .bundle import load_bundle

            return cls(*load_bundle(path), bundle=path)
        onnx = OnnxModel(verify_file(path, ONNX, config, recorded=True))
        if backend == "onnx-int8":
            margin = float(config.get("onnx", {}).get("int8", {}).get("fallback_margin", 0.0))
            onnx = OnnxModel(verify_file(path, ONNX_INT8, config, recorded=True), fallback=onnx, margin=margin)
        return cls(None, config, onnx=onnx, bundle=path, backend=backend)

    @property
    def model(self):
        """The PyTorch model; loaded on first use when predictions run on ONNX Runtime (Grad-CAM needs it)."""
        if self._model is None:
            from .bundle import load_bundle

            self._model, _ = load_bundle(self.bundle)
        return self._model

    def preprocess(self, source: str | os.PathLike | bytes) -> np.ndarray:
        """One image → uint8 size×size array, exactly as training saw it. Raises ImageError."""
        return load_image(source, self.size)

    def probabilities(self, images: np.ndarray) -> np.ndarray:
        """N×size×size uint8 → N×C float32 class probabilities, on the chosen backend."""
        if self.onnx is not None:
            return self.onnx(images)
        from .models import predict_probs

        return predict_probs(self.model, images)

    def result(self, probs: np.ndarray) -> dict[str, Any]:
        return {
            "label": self.classes[int(np.argmax(probs))],
            "probabilities": {c: round(float(p), 6) for c, p in zip(self.classes, probs)},
        }

    def predict(self, sources: list[str | os.PathLike | bytes]) -> list[dict[str, Any]]:
        """Predict every source; raises ImageError on the first unreadable one."""
        images = np.stack([self.preprocess(s) for s in sources])
        return [self.result(p) for p in self.probabilities(images)]
