"""`Predictor`: image files or bytes → the same preprocessing as training → class probabilities,
out-of-distribution score and referral flag.

The CLI, the server and the SageMaker handlers all predict through this class. The model's logits
and features come from PyTorch or, when the bundle has an exported graph (`covid-xray export`),
from ONNX Runtime on CPU; `backend` chooses, `auto` prefers the fp32 ONNX graph. ONNX Runtime and
PyTorch are imported only when used, so a command that predicts with ONNX never pays for importing
torch. Temperature scaling, the OOD guard and the referral rule are fitted at training time and
stored in the bundle; they are applied here, the same way for every backend.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from . import ood
from .bundle import ONNX, ONNX_INT8, BundleConfig, read_config, verify_file
from .images import load_image
from .errors import ModelError
from .calibration import refer_reasons, softmax
from .util import cpu_count, onnx_available

BACKENDS = ("auto", "torch", "onnx", "onnx-int8")
# Lets `serve` and the SageMaker handlers, which load a bundle without options, pick a backend.
BACKEND_ENV = "COVID_XRAY_BACKEND"


def onnx_session(path: Path, threads: int | None = None):
    """A CPU session with `threads` intra-op threads (default: every usable core)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    # One request at a time uses every allowed core; a second (inter-op) pool would only compete with it.
    options.intra_op_num_threads = threads or cpu_count()
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
    """Logits and features from an exported graph. With a `fallback`, images whose top-2 probability
    margin is below `margin` are re-scored by it: int8 error can flip only near-ties, and those are few."""

    def __init__(self, path: Path, fallback: OnnxModel | None = None, margin: float = 0.0, threads: int | None = None):
        self.session = onnx_session(path, threads)
        self.input = self.session.get_inputs()[0].name
        self.shapes = [int(out.shape[1]) for out in self.session.get_outputs()]  # classes, feature size
        self.fallback, self.margin = fallback, margin

    def __call__(self, images: np.ndarray, batch_size: int = 8) -> tuple[np.ndarray, np.ndarray]:
        """uint8 N×S×S images (an array, or anything sliceable into arrays, such as a split's cached
        images) → logits N×C and features N×D, `batch_size` at a time: on CPU, runs of 4-8 images were
        5-15% faster per image than 32, whose activations outgrow the caches."""
        if not len(images):
            return tuple(np.zeros((0, n), np.float32) for n in self.shapes)
        runs = [self.session.run(None, {self.input: np.asarray(images[i : i + batch_size])[:, None]})
                for i in range(0, len(images), batch_size)]
        logits, features = (np.concatenate(parts) for parts in zip(*runs))
        if self.fallback is not None:
            top2 = np.sort(softmax(logits), axis=1)[:, -2:]
            near = top2[:, 1] - top2[:, 0] < self.margin
            if near.any():
                logits[near], features[near] = self.fallback(np.asarray(images[:])[near], batch_size)
        return logits, features


def resolve_backend(requested: str | None, config: BundleConfig, bundle: Path) -> str:
    """The backend to use: the one asked for (checked), or for `auto` ONNX when exported and installed."""
    requested = requested or os.environ.get(BACKEND_ENV) or "auto"
    if requested not in BACKENDS:
        raise ModelError(f"unknown backend {requested!r}; choose one of {', '.join(BACKENDS)}")
    exported = config.files
    has_ort = onnx_available(("onnxruntime",))
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


def load_guard(bundle: Path, config: BundleConfig) -> ood.OODGuard | None:
    """The bundle's out-of-distribution guard (None for a bundle trained without one)."""
    if config.ood is None:
        return None
    return ood.OODGuard.load(verify_file(bundle, ood.FILE, config, recorded=True), config.ood)


@dataclass(frozen=True)
class Scores:
    """What the model says about one image: calibrated class probabilities, its OOD score and its
    distance to the training films of its predicted class (None where the bundle has no such check)."""

    probabilities: np.ndarray
    ood_score: float | None
    class_distance: float | None = None


class Predictor:
    def __init__(self, model, config: BundleConfig, onnx: OnnxModel | None = None,
                 bundle: Path | None = None, backend: str = "torch", guard: ood.OODGuard | None = None):
        self._model = model
        self.config = config
        self.classes: list[str] = list(config.classes)
        self.size: int = config.input_size
        self.onnx = onnx
        self.bundle = bundle
        self.backend = backend
        self.guard = guard
        self.temperature = config.temperature
        self.refer_below = config.referral_threshold

    @classmethod
    def from_bundle(cls, path: str | os.PathLike, backend: str | None = None, threads: int | None = None) -> Predictor:
        """backend: auto | torch | onnx | onnx-int8 (default: $COVID_XRAY_BACKEND, else auto).
        threads: ONNX Runtime's intra-op threads (default: every usable core); PyTorch's are set per thread."""
        path = Path(path)
        config = read_config(path)
        backend = resolve_backend(backend, config, path)
        guard = load_guard(path, config)
        if backend == "torch":
            from .bundle import load_bundle

            return cls(*load_bundle(path), bundle=path, guard=guard)
        onnx = OnnxModel(verify_file(path, ONNX, config, recorded=True), threads=threads)
        if backend == "onnx-int8":
            margin = float(config.onnx.get("int8", {}).get("fallback_margin", 0.0))
            onnx = OnnxModel(verify_file(path, ONNX_INT8, config, recorded=True), fallback=onnx, margin=margin,
                             threads=threads)
        return cls(None, config, onnx=onnx, bundle=path, backend=backend, guard=guard)

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

    def outputs(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """N×size×size uint8 → logits N×C and penultimate features N×D, on the chosen backend."""
        if self.onnx is not None:
            return self.onnx(images)
        from .models import predict_outputs

        return predict_outputs(self.model, images)

    def probabilities(self, images: np.ndarray) -> np.ndarray:
        """N×size×size uint8 → N×C float32 calibrated class probabilities."""
        return softmax(self.outputs(images)[0], self.temperature)

    def score(self, images: np.ndarray) -> list[Scores]:
        """N×size×size uint8 → per image, calibrated probabilities and OOD score."""
        logits, features = self.outputs(images)
        probs = softmax(logits, self.temperature)
        if self.guard is None:
            return [Scores(p, None) for p in probs]
        ood_scores = self.guard.score(features, images)
        if self.guard.classes is None:
            return [Scores(p, float(s)) for p, s in zip(probs, ood_scores)]
        distances = self.guard.classes.score(features, probs.argmax(1))
        return [Scores(p, float(s), float(d)) for p, s, d in zip(probs, ood_scores, distances)]

    def _flags(self, scores: Scores) -> tuple[bool | None, bool | None]:
        """(out of distribution, unlike its predicted class's training films), None where not checked."""
        if self.guard is None:
            return None, None
        atypical = None if scores.class_distance is None else bool(self.guard.classes.flags(scores.class_distance))
        return bool(self.guard.flags(scores.ood_score)), atypical

    def assess(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """N×size×size uint8 → calibrated N×C probabilities and each image's `refer` flag, as `result` sets it."""
        scores = self.score(images)
        probs = np.stack([s.probabilities for s in scores]) if scores else np.zeros((0, len(self.classes)), np.float32)
        return probs, np.array([self.result(s)["refer"] for s in scores], bool)

    def result(self, scores: Scores) -> dict[str, Any]:
        """The JSON-ready prediction: label, probabilities, and the flags a clinician must see.

        `ood`: the image does not look like the training X-rays. `atypical`: it is unlike the training
        films of the class it is called (an older adult's Normal film called Covid because every such
        film in training was Covid). `refer`: do not act on this answer without a radiologist (either
        flag, or calibrated confidence below the threshold chosen on validation for the target Covid
        sensitivity); `refer_reasons` says which."""
        probs = scores.probabilities
        ood_flag, atypical = self._flags(scores)
        reasons = refer_reasons(float(probs.max()), self.refer_below, ood_flag, atypical)
        return {
            "label": self.classes[int(np.argmax(probs))],
            "probabilities": {c: round(float(p), 6) for c, p in zip(self.classes, probs)},
            "ood": ood_flag,
            "ood_score": None if scores.ood_score is None else round(scores.ood_score, 4),
            "atypical": atypical,
            "class_distance": None if scores.class_distance is None else round(scores.class_distance, 4),
            "refer": bool(reasons),
            "refer_reasons": reasons,
        }

    def predict(self, sources: list[str | os.PathLike | bytes]) -> list[dict[str, Any]]:
        """Predict every source; raises ImageError on the first unreadable one."""
        images = np.stack([self.preprocess(s) for s in sources])
        return [self.result(s) for s in self.score(images)]
