"""Reading X-ray images safely and fast: any file or bytes (JPEG, PNG, TIFF, BMP, WebP in any mode,
DICOM) to 8-bit grayscale at the model's size, and the disk cache that decodes every image of a dataset
once. Every path that turns a file or bytes into model input goes through `load_image`, so training,
evaluation, `predict` and the server see identical pixels.
"""

from __future__ import annotations

import hashlib
import io
import os
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from .data import Sample
from .errors import ImageError
from .util import atomic_write, cpu_count

# Anything larger is refused before decoding (a decompression bomb, not an X-ray).
MAX_IMAGE_PIXELS = 80_000_000
Image.MAX_IMAGE_PIXELS = MAX_IMAGE_PIXELS


def is_dicom(data: bytes) -> bool:
    return data[128:132] == b"DICM"


def load_image(source: str | os.PathLike | bytes, size: int | None = None) -> np.ndarray:
    """Read a file or bytes as an 8-bit grayscale X-ray, resized to size×size when given.

    Handles every Pillow mode (8/16-bit, alpha, palette, CMYK, EXIF rotation) and DICOM.
    Large JPEGs are decoded at reduced scale (Pillow draft), which is most of the speed on
    multi-megapixel hospital exports. Raises ImageError naming the source on any failure.
    """
    name = "<bytes>" if isinstance(source, bytes) else str(source)
    try:
        data = source if isinstance(source, bytes) else Path(source).read_bytes()
    except OSError as e:
        raise ImageError(f"{name}: cannot read file ({e.strerror or e})") from None
    if not data:
        raise ImageError(f"{name}: empty file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = _decode_dicom(data) if is_dicom(data) else _decode_pillow(data, size)
            if size is not None and img.size != (size, size):
                img = img.resize((size, size), Image.Resampling.BILINEAR)
            return np.asarray(img, dtype=np.uint8)
    except ImageError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise ImageError(f"{name}: image is larger than {MAX_IMAGE_PIXELS:,} pixels; refusing to decode") from None
    except UnidentifiedImageError:
        raise ImageError(f"{name}: not an image (no known image format or DICOM header)") from None
    except Exception as e:  # truncated/corrupt data surfaces as many different exception types
        if is_dicom(data):  # a DICOM reader's message can quote header bytes: patient data, never repeated
            raise ImageError(f"{name}: corrupt DICOM file ({type(e).__name__} while decoding its pixel data "
                             "or image header)") from None
        raise ImageError(f"{name}: corrupt image ({type(e).__name__}: {e})") from None


def _decode_pillow(data: bytes, size: int | None) -> Image.Image:
    img = Image.open(io.BytesIO(data))
    if size is not None and img.format == "JPEG":
        # JPEG decodes at 1/2, 1/4 or 1/8 scale directly (and straight to luma), never below size.
        img.draft("L", (size, size))
    img = ImageOps.exif_transpose(img)  # also forces the full decode, so corrupt data fails here
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        return Image.fromarray(_to_uint8(np.asarray(img, dtype=np.float32)))
    return img if img.mode == "L" else img.convert("L")


# The only DICOM elements read: the pixels and what it takes to turn them into a grey image. A header's
# patient name, ID, birth date, accession number… are never parsed, so no message or log can carry them.
DICOM_PIXEL_TAGS = [
    "PixelData", "FloatPixelData", "DoubleFloatPixelData", "Rows", "Columns", "NumberOfFrames", "SamplesPerPixel",
    "PhotometricInterpretation", "PlanarConfiguration", "BitsAllocated", "BitsStored", "HighBit",
    "PixelRepresentation", "ExtendedOffsetTable", "ExtendedOffsetTableLengths", "RescaleSlope", "RescaleIntercept",
    "RescaleType", "ModalityLUTSequence", "VOILUTSequence", "WindowCenter", "WindowWidth", "VOILUTFunction",
]


def _decode_dicom(data: bytes) -> Image.Image:
    import pydicom
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    ds = pydicom.dcmread(io.BytesIO(data), specific_tags=DICOM_PIXEL_TAGS)
    if "PixelData" not in ds:
        raise ImageError("DICOM file has no pixel data")
    # pydicom allocates rows×columns×frames before decoding: check the header first (DICOM bomb).
    frames = int(getattr(ds, "NumberOfFrames", 1) or 1)
    if int(ds.Rows) * int(ds.Columns) * max(frames, 1) * int(getattr(ds, "SamplesPerPixel", 1) or 1) > MAX_IMAGE_PIXELS:
        raise ImageError(f"DICOM image is larger than {MAX_IMAGE_PIXELS:,} pixels; refusing to decode")
    pixels = ds.pixel_array
    if getattr(ds, "NumberOfFrames", 1) not in (None, 1) and pixels.ndim > 2:
        pixels = pixels[0]
    photometric = str(getattr(ds, "PhotometricInterpretation", "MONOCHROME2"))
    if pixels.ndim == 3:  # colour DICOM (secondary capture): use luminance
        return Image.fromarray(pixels.astype(np.uint8)).convert("L")
    pixels = apply_voi_lut(apply_modality_lut(pixels, ds), ds).astype(np.float32)
    gray = _to_uint8(pixels)
    return Image.fromarray(255 - gray if photometric == "MONOCHROME1" else gray)


def _to_uint8(pixels: np.ndarray) -> np.ndarray:
    lo, hi = float(pixels.min()), float(pixels.max())
    if hi <= lo:
        return np.zeros(pixels.shape, dtype=np.uint8)
    return np.round((pixels - lo) * (255.0 / (hi - lo))).astype(np.uint8)


# Bump when load_image's output changes: cached decodes made by older code are then ignored.
PREPROCESS_VERSION = 1
CACHE_ENV_VAR = "COVID_XRAY_CACHE"


def default_cache_dir() -> Path:
    if os.environ.get(CACHE_ENV_VAR):
        return Path(os.environ[CACHE_ENV_VAR])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "covid-xray"


class CachedImages:
    """Decoded images stored one .npy file each, read on access.

    Memory stays flat however large the dataset; indexing with a slice returns a stacked batch.
    """

    def __init__(self, files: list[Path]):
        self.files = files

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int | slice) -> np.ndarray:
        """An int gives one image, a slice a stacked batch (`images[:]` loads them all)."""
        if isinstance(index, slice):
            return np.stack([np.load(f) for f in self.files[index]])
        return np.load(self.files[index])


@dataclass
class Decoded:
    """The samples of one split that decoded, their cached images, content digests and skipped files."""

    images: CachedImages
    samples: list[Sample]
    digests: list[str]
    bad: list[str]  # one-line reasons for skipped files

    def subset(self, keep: list[int]) -> Decoded:
        """These samples only; the skipped files stay recorded with the whole split, not here."""
        return Decoded(CachedImages([self.images.files[i] for i in keep]), [self.samples[i] for i in keep],
                       [self.digests[i] for i in keep], [])


def decode_samples(
    samples: list[Sample],
    size: int,
    *,
    skip_bad: bool = False,
    cache_dir: Path | None = None,
    workers: int | None = None,
) -> Decoded:
    """Decode and resize every sample once, into a disk cache keyed by file content and preprocessing
    settings, so later epochs and later runs never decode again. Threads: Pillow releases the GIL."""
    folder = (cache_dir or default_cache_dir()) / f"size{size}-v{PREPROCESS_VERSION}"

    def one(sample: Sample) -> tuple[Path | None, str | None, str | None]:
        try:
            data = sample.path.read_bytes()
            digest = hashlib.sha256(data).hexdigest()
            target = folder / digest[:2] / f"{digest}.npy"
            if not target.exists():
                _save_atomic(target, load_image(data, size))
            return target, digest, None
        except ImageError as e:
            return None, None, f"{sample.path}: {str(e).split(': ', 1)[-1]}"
        except OSError as e:
            return None, None, f"{sample.path}: cannot read file ({e.strerror or e})"

    with ThreadPoolExecutor(max_workers=workers or cpu_count()) as pool:
        results = list(pool.map(one, samples))
    bad = [reason for _, _, reason in results if reason]
    if bad and not skip_bad:
        raise ImageError(f"{bad[0]} (use --skip-bad-images to skip unreadable files)")
    kept = [(s, r) for s, r in zip(samples, results) if r[2] is None]
    return Decoded(CachedImages([r[0] for _, r in kept]), [s for s, _ in kept], [r[1] for _, r in kept], bad)


def _save_atomic(target: Path, array: np.ndarray) -> None:
    # Several processes (DDP ranks, parallel runs) may fill the same cache: never expose a partial file.
    target.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(target, lambda f: np.save(f, array))
