"""Synthetic test images: chest-film-like pictures made on the fly, encoded files, and small class-folder
datasets. Shared by the tests as a plain module (not through conftest)."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image


def xray_like(size: int = 96, seed: int = 0, mode: str = "L") -> Image.Image:
    """A synthetic chest-film-like image: dark background, two bright lung-shaped ellipses, noise."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    img = 40 + 60 * np.exp(-(((xx - 0.5) / 0.35) ** 2 + ((yy - 0.5) / 0.45) ** 2))
    for cx in (0.32, 0.68):
        img += 90 * (((xx - cx) / 0.14) ** 2 + ((yy - 0.5) / 0.3) ** 2 < 1)
    img += rng.normal(0, 8, img.shape)
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).convert(mode)


def encode(img: Image.Image, fmt: str = "JPEG", **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def make_class_tree(root: Path, classes=("A", "B", "C"), per_class: int = 8, size: int = 64, seed: int = 0) -> Path:
    """A tiny class-folder dataset where each class has a distinct brightness (easy to learn); a
    different `seed` gives different images (another source)."""
    for ci, c in enumerate(classes):
        (root / c).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            img = np.asarray(xray_like(size, seed=seed + ci * 100 + i), dtype=np.int16) + (ci - 1) * 50
            Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(root / c / f"{c}_{i}.png")
    return root
