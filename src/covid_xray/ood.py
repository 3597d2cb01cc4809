"""Out-of-distribution guard: is this image like the chest X-rays the model was trained on, and like
the training films of the class it is called?

The guard's score is the cosine distance from an image's penultimate features to its k-th nearest
training image (deep k-nearest-neighbours, Sun et al. 2022): it needs no assumption about the
shape of the feature distribution, and a photo, a document or noise lands far from every X-ray
even when the classifier is confident about it. The class distance (`ClassDistance`) asks the second
question: the Mahalanobis distance to the mean training feature of the predicted class (Lee et al. 2018),
which grows for a film the model calls Covid although it lies apart from the training Covid films. Both
are stored in the bundle (`ood.safetensors`); their thresholds are set on validation X-rays, which
neither saw. docs/experiments.md ("Cross-site") has how this rule was chosen over others.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

FILE = "ood.safetensors"
K = 5
# The threshold sits this far above the largest validation score: validation holds a few dozen
# images, so its top score underestimates how far genuine X-rays (another scanner, another
# hospital) can lie; non-X-rays score several times higher.
MARGIN = 1.25
# A blank or nearly uniform image (a failed export, a solid colour) carries nothing to compare, yet its
# features can land among the X-rays'; below this pixel standard deviation (of 255 grey levels) it gets
# the largest possible score. Real films, even flat ones, are far above it.
BLANK_STD = 4.0
MAX_SCORE = 2.0
# The share of validation films the class distance alone may refer (its threshold is their 95th percentile).
CLASS_PERCENTILE = 95.0


def _normalise(features: np.ndarray) -> np.ndarray:
    features = np.asarray(features, np.float32)
    return features / np.maximum(np.linalg.norm(features, axis=1, keepdims=True), 1e-12)


def blank(images: Sequence[np.ndarray]) -> np.ndarray:
    """Which images are blank (pixel standard deviation below BLANK_STD). `images`: uint8 N×H×W, or a
    split's lazily loaded images, read one at a time so that a large split never sits in memory."""
    return np.array([np.std(images[i]) < BLANK_STD for i in range(len(images))], bool)


@dataclass
class ClassDistance:
    """Mahalanobis distance of L2-normalised features to their predicted class's mean training feature,
    one covariance shared by the classes (Ledoit–Wolf shrinkage: a few hundred films, ~1000 dimensions)."""

    means: np.ndarray  # C×D
    precision: np.ndarray  # D×D
    threshold: float

    @classmethod
    def fit(cls, train_features: np.ndarray, train_labels, val_features: np.ndarray, val_predicted,
            n_classes: int | None = None, percentile: float = CLASS_PERCENTILE) -> ClassDistance:
        """`n_classes`: the model's (default: the training labels'). A class without training films gets a
        zero mean, far from every film, so a film called that class is always atypical."""
        from sklearn.covariance import LedoitWolf

        features, labels = _normalise(train_features), np.asarray(train_labels)
        means = np.stack([features[labels == c].mean(0) if (labels == c).any() else np.zeros(features.shape[1])
                          for c in range(n_classes or int(labels.max()) + 1)]).astype(np.float32)
        precision = LedoitWolf(assume_centered=True).fit(features - means[labels]).precision_.astype(np.float32)
        distance = cls(means, precision, threshold=float("inf"))
        if len(val_features):
            distance.threshold = float(np.percentile(distance.score(val_features, val_predicted), percentile))
        return distance

    def score(self, features: np.ndarray, predicted) -> np.ndarray:
        """Per image, the distance to the mean training feature of its predicted class (index)."""
        centred = _normalise(features) - self.means[np.asarray(predicted, int)]
        return np.sqrt(np.maximum(np.einsum("nd,de,ne->n", centred, self.precision, centred), 0)).astype(np.float32)

    def flags(self, scores: np.ndarray) -> np.ndarray:
        return np.asarray(scores) > self.threshold

    def config(self) -> dict[str, Any]:
        return {"method": "Mahalanobis distance to the predicted class's mean training feature (shared covariance, "
                          "Ledoit-Wolf)", "threshold": round(self.threshold, 6),
                "fitted_on": f"val, {CLASS_PERCENTILE:g}th percentile"}


@dataclass
class OODGuard:
    bank: np.ndarray  # M×D L2-normalised training features
    threshold: float
    k: int = K
    margin: float = MARGIN
    classes: ClassDistance | None = None  # None in bundles made before it

    @classmethod
    def fit(cls, train_features: np.ndarray, val_features: np.ndarray, train_labels=None, val_predicted=None,
            n_classes: int | None = None, k: int = K, margin: float = MARGIN) -> OODGuard:
        """Store the training features; set the thresholds from validation images' scores. With the training
        labels and the classes predicted for validation, also fit the class distance."""
        bank = _normalise(train_features)
        classes = None if train_labels is None else ClassDistance.fit(train_features, train_labels, val_features,
                                                                      val_predicted, n_classes)
        guard = cls(bank, threshold=float("inf"), k=min(k, len(bank)), margin=margin, classes=classes)
        guard.threshold = float(guard.score(val_features).max() * margin) if len(val_features) else float("inf")
        return guard

    def score(self, features: np.ndarray, images: Sequence[np.ndarray] | None = None) -> np.ndarray:
        """Cosine distance to the k-th nearest training image: ~0 for familiar images, up to 2.
        With the images the features came from (see `blank`), blank ones score 2."""
        similarity = _normalise(features) @ self.bank.T
        distance = (1.0 - np.partition(similarity, -self.k, axis=1)[:, -self.k]).astype(np.float32)
        if images is not None:
            distance[blank(images)] = MAX_SCORE
        return distance

    def flags(self, scores: np.ndarray) -> np.ndarray:
        return np.asarray(scores) > self.threshold

    def config(self) -> dict[str, Any]:
        config = {"method": "k-NN cosine distance on penultimate features", "k": self.k, "margin": self.margin,
                  "threshold": round(self.threshold, 6), "file": FILE, "training_images": len(self.bank)}
        if self.classes is not None:
            config["class_distance"] = self.classes.config()
        return config

    def to_bytes(self) -> bytes:
        """The training features (and the class means and precision) as safetensors, for the bundle."""
        from safetensors.numpy import save

        tensors = {"bank": self.bank}
        if self.classes is not None:
            tensors |= {"class_means": self.classes.means, "precision": self.classes.precision}
        return save({name: np.ascontiguousarray(t) for name, t in tensors.items()})

    @classmethod
    def load(cls, path: Path, config: dict[str, Any]) -> OODGuard:
        """From the bundle's file (checksum already verified) and its config.json entry."""
        from safetensors.numpy import load_file

        tensors = load_file(path)
        classes = None
        if "class_distance" in config:
            classes = ClassDistance(tensors["class_means"], tensors["precision"],
                                    float(config["class_distance"]["threshold"]))
        return cls(tensors["bank"], threshold=float(config["threshold"]), k=int(config["k"]),
                   margin=float(config["margin"]), classes=classes)


def synthetic_outliers(size: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Images that are certainly not chest X-rays, by kind (uint8 N×size×size): a self-check that
    training runs on its own guard and reports (`metrics.json` → ood → synthetic_outliers)."""
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    documents = []
    for i in range(4):
        page = Image.new("L", (size, size), 245 - 20 * i)
        draw = ImageDraw.Draw(page)
        for line in range(6, size - 6, max(8, size // 18)):
            words = " ".join("".join(rng.choice(list("abcdefghijklmnopqrstuvwxyz"), rng.integers(2, 9)))
                             for _ in range(12))
            draw.text((6, line), words, fill=int(rng.integers(0, 60)))
        documents.append(np.asarray(page))
    kinds = {
        "noise": [rng.integers(0, 256, (size, size)), np.clip(rng.normal(128, 50, (size, size)), 0, 255),
                  np.where(rng.random((size, size)) < 0.5, 0, 255)],
        "solid": [np.full((size, size), v) for v in (0, 60, 128, 200, 255)],
        "document": documents,
        "pattern": [(xx * 255), ((np.floor(xx * 8) + np.floor(yy * 8)) % 2) * 255,
                    127 + 127 * np.sin(2 * np.pi * 6 * xx) * np.cos(2 * np.pi * 6 * yy)],
    }
    return {kind: np.stack(images).astype(np.uint8) for kind, images in kinds.items()}
