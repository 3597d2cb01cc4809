"""`Predictor`: image files or bytes → the same preprocessing as training → class probabilities.

The CLI, the server and the SageMaker handlers all predict through this class.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from .data import load_image


class Predictor:
    def __init__(self, model, config: dict[str, Any]):
        self.model = model
        self.config = config
        self.classes: list[str] = list(config["classes"])
        self.size: int = int(config["input_size"])

    @classmethod
    def from_bundle(cls, path: str | os.PathLike) -> "Predictor":
        from .bundle import load_bundle

        return cls(*load_bundle(path))

    def preprocess(self, source: str | os.PathLike | bytes) -> np.ndarray:
        """One image → uint8 size×size array, exactly as training saw it. Raises ImageError."""
        return load_image(source, self.size)

    def probabilities(self, images: np.ndarray) -> np.ndarray:
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

    def predict_paths(self, paths: list[Path]) -> list[dict[str, Any]]:
        """Like `predict`, but an unreadable file yields an `error` entry instead of stopping."""
        from .errors import ImageError

        rows: list[dict[str, Any]] = []
        good: list[tuple[int, np.ndarray]] = []
        for i, path in enumerate(paths):
            rows.append({"path": str(path)})
            try:
                good.append((i, self.preprocess(path)))
            except ImageError as e:
                rows[i]["error"] = str(e)
        if good:
            probs = self.probabilities(np.stack([img for _, img in good]))
            for (i, _), p in zip(good, probs):
                rows[i].update(self.result(p))
        return rows
