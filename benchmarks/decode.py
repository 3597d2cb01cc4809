"""Decode time per image, with and without Pillow draft decoding, on generated 2000–4000 px JPEGs,
against the model's time per image: how much of a prediction is spent turning the file into pixels.

    python benchmarks/decode.py [--sizes 2000 3000 4000] [--threads N]

"with draft" is `covid_xray.images.load_image` (what training, predict and the server run): the JPEG
is decoded at 1/2, 1/4 or 1/8 scale straight to luma. "without draft" is the same code with the
draft line left out: a full-size decode, then the resize. Images are decoded from bytes in memory,
so disk speed does not enter.
"""

from __future__ import annotations

import argparse
import io
import sys
import tempfile
from functools import partial
from pathlib import Path

import numpy as np
from _common import latency_row, machine, print_table, time_calls, use_cores, xray_jpeg
from PIL import Image, ImageOps

from covid_xray.images import load_image


def decode_without_draft(data: bytes, size: int) -> np.ndarray:
    """load_image's Pillow path minus `draft`: full-size decode, then grayscale and resize."""
    img = ImageOps.exif_transpose(Image.open(io.BytesIO(data)))
    img = img if img.mode == "L" else img.convert("L")
    return np.asarray(img.resize((size, size), Image.Resampling.BILINEAR), dtype=np.uint8)


def model_seconds(size: int) -> dict[str, np.ndarray]:
    """Seconds per single-image prediction (what a request pays after decoding), per backend."""
    from covid_xray.models import DEFAULT_BACKBONE, create_model, predict_probs

    model = create_model(DEFAULT_BACKBONE, 3, weights="none").eval()  # weights do not change the time
    image = np.zeros((1, size, size), np.uint8)
    times = {"PyTorch eager": time_calls(lambda: predict_probs(model, image))}
    try:
        from covid_xray.export import export_onnx
        from covid_xray.inference import OnnxModel
    except ImportError:
        return times
    with tempfile.TemporaryDirectory() as tmp:
        export_onnx(model, size, Path(tmp) / "model.onnx")
        onnx = OnnxModel(Path(tmp) / "model.onnx")
        times["ONNX Runtime fp32"] = time_calls(lambda: onnx(image))
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[2000, 2500, 3000, 3500, 4000], help="long side, px")
    parser.add_argument("--threads", type=int, help="cores for the model (default: all usable)")
    args = parser.parse_args()
    use_cores(args.threads)
    from covid_xray.models import DEFAULT_BACKBONE, input_size  # imports torch: after use_cores

    size = input_size(DEFAULT_BACKBONE)
    print(f"{machine()}; model input {size}×{size}", file=sys.stderr)

    rows = []
    draft_times = []
    for long_side in args.sizes:
        for mode in ("L", "RGB"):
            width, height = long_side * 4 // 5, long_side  # portrait, like most chest films
            data = xray_jpeg(width, height, mode)
            assert load_image(data, size).shape == (size, size)
            fast = time_calls(partial(load_image, data, size), min_calls=5, min_seconds=1)
            slow = time_calls(partial(decode_without_draft, data, size), min_calls=5, min_seconds=1)
            draft_times.append(np.median(fast))
            rows.append({
                "JPEG": f"{width}×{height} {'gray' if mode == 'L' else 'RGB'}", "MB": f"{len(data) / 1e6:.1f}",
                "draft ms": f"{np.median(fast) * 1e3:.1f}", "no draft ms": f"{np.median(slow) * 1e3:.1f}",
                "speed-up": f"{np.median(slow) / np.median(fast):.1f}×",
            })
    print("Decode + resize to the model input, median per image\n")
    print_table(rows)

    print("\nModel time per image (batch 1) and the share of a prediction spent decoding (draft, mean over the JPEGs above)\n")
    decode = float(np.mean(draft_times))
    print_table([
        {**latency_row(name, t, 1), "decode share": f"{decode / (decode + np.median(t)):.0%}"}
        for name, t in model_seconds(size).items()
    ])


if __name__ == "__main__":
    main()
