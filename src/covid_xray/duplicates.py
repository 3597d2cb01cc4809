"""Duplicates and leakage between splits: what one file is (hashes, stored header properties, a thumbnail's
statistics), groups of exact copies, pairs of near copies, and the test images that copy an image the model
trained or was selected on. Needs no trained model.

Every file is read once: its bytes give the SHA-256 (exact copies) and a 64×64 grayscale thumbnail
gives a 256-bit perceptual hash (near copies: re-encoded, resized or contrast-changed versions).
"""

from __future__ import annotations

import hashlib
import io
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .images import is_dicom, load_image
from .errors import ImageError

if TYPE_CHECKING:
    from .audit import AuditReport

# phash over a 16×16 DCT block (256 bits). On chest films the 64-bit default puts different patients
# within 4 bits of each other; at 256 bits the Kaggle set's true near copies are ≤ 24 bits apart and
# distinct films ≥ 60, so 32 sits in the gap.
HASH_SIZE = 16
NEAR_THRESHOLD = 32
THUMBNAIL = HASH_SIZE * 4  # phash's own working resolution: decoding straight to it skips a resample


@dataclass(frozen=True)
class FileInfo:
    """What the audit learns from one file; `error` is set (and the rest empty) when it is unreadable."""

    path: Path
    split: str
    label: str
    source: str = ""
    sha256: str = ""
    phash: np.ndarray | None = field(default=None, compare=False, repr=False)  # HASH_SIZE² bools
    width: int = 0
    height: int = 0
    mode: str = ""
    format: str = ""
    size_bytes: int = 0
    mean: float = 0.0
    std: float = 0.0
    error: str | None = None


@dataclass(frozen=True)
class NearPair:
    a: FileInfo
    b: FileInfo
    distance: int  # Hamming distance between the perceptual hashes, in bits


@dataclass(frozen=True)
class Leak:
    """A test image that is an exact or near copy of an image the model trained or was selected on."""

    path: Path
    kind: str  # "exact" or "near"
    copies: tuple[Path, ...]
    distance: int  # 0 for exact copies


def leaked_test_paths(report: AuditReport) -> set[Path]:
    """Test images that are exact or near copies of a training or validation image."""
    return {leak.path for leak in report.leaks}


def inspect_file(path: Path, split: str, label: str, source: str = "") -> FileInfo:
    """Read one file once: hashes, header properties and thumbnail statistics."""
    try:
        data = path.read_bytes()
    except OSError as e:
        return FileInfo(path, split, label, source, error=f"cannot read file ({e.strerror or e})")
    try:
        thumb = load_image(data, THUMBNAIL)
        width, height, mode, fmt = _header(data)
    except ImageError as e:
        return FileInfo(path, split, label, source, error=str(e).split(": ", 1)[-1])
    return FileInfo(
        path, split, label, source, sha256=hashlib.sha256(data).hexdigest(), phash=_phash(thumb),
        width=width, height=height, mode=mode, format=fmt, size_bytes=len(data),
        mean=float(thumb.mean()), std=float(thumb.std()),
    )


def _header(data: bytes) -> tuple[int, int, str, str]:
    """Width, height, mode and format as stored (not as decoded): these are what a shortcut would use."""
    if is_dicom(data):
        import pydicom

        ds = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True)
        mode = f"{getattr(ds, 'PhotometricInterpretation', '?')} {getattr(ds, 'BitsStored', '?')}-bit"
        return int(ds.Columns), int(ds.Rows), mode, "DICOM"
    from PIL import Image

    with Image.open(io.BytesIO(data)) as img:  # reads the header only
        return img.width, img.height, img.mode, img.format or "?"


def _phash(thumb: np.ndarray) -> np.ndarray:
    import imagehash
    from PIL import Image

    return imagehash.phash(Image.fromarray(thumb), hash_size=HASH_SIZE).hash.flatten()


def find_exact_groups(files: list[FileInfo]) -> list[list[FileInfo]]:
    """Files sharing one SHA-256, two or more per group."""
    by_hash: dict[str, list[FileInfo]] = defaultdict(list)
    for f in files:
        by_hash[f.sha256].append(f)
    return sorted((g for g in by_hash.values() if len(g) > 1), key=lambda g: [str(f.path) for f in g])


def find_near_pairs(files: list[FileInfo], threshold: int, chunk: int = 256) -> list[NearPair]:
    """All pairs with different bytes and perceptual hashes within `threshold` bits (all pairs compared)."""
    if len(files) < 2:
        return []
    bits = np.stack([f.phash for f in files]).astype(np.float32)
    inverse = 1.0 - bits
    pairs = []
    for start in range(0, len(files), chunk):  # rows in chunks: memory stays O(chunk · n) for large sets
        block = bits[start : start + chunk]
        distance = block @ inverse.T + (1.0 - block) @ bits.T  # Hamming distance as two matrix products
        for i, j in zip(*np.nonzero(distance <= threshold)):
            a, b = start + int(i), int(j)
            if a < b and files[a].sha256 != files[b].sha256:
                pairs.append(NearPair(files[a], files[b], int(round(distance[i, j]))))
    return sorted(pairs, key=lambda p: (p.distance, str(p.a.path), str(p.b.path)))


def find_leaks(exact_groups: list[list[FileInfo]], near_pairs: list[NearPair]) -> list[Leak]:
    """Test files with an exact or near copy in train or val; an exact copy takes precedence."""
    copies: dict[Path, dict[str, Any]] = {}
    for group in exact_groups:
        seen = [f.path for f in group if f.split != "test"]
        for f in group:
            if f.split == "test" and seen:
                copies[f.path] = {"kind": "exact", "copies": seen, "distance": 0}
    for pair in near_pairs:
        for test, other in ((pair.a, pair.b), (pair.b, pair.a)):
            if test.split != "test" or other.split == "test" or copies.get(test.path, {}).get("kind") == "exact":
                continue
            entry = copies.setdefault(test.path, {"kind": "near", "copies": [], "distance": pair.distance})
            entry["copies"].append(other.path)
            entry["distance"] = min(entry["distance"], pair.distance)
    return [Leak(p, e["kind"], tuple(e["copies"]), e["distance"]) for p, e in sorted(copies.items())]
