"""Inference speed of one model on every backend, on the same images, in one run:
eager PyTorch at batch 1 and 32, ONNX Runtime fp32 and int8 at batch 1 and 32, and a whole
single-image prediction from 1024×1024 JPEG bytes (decode + model: an /invocations request minus HTTP).

    python benchmarks/inference.py [--bundle RUN/model] [--data DIR] [--threads N]

Without --bundle the default backbone with ImageNet weights and an untrained head is timed (weights
do not change the time). The bundle is copied and exported (fp32, and int8 calibrated on training
images when data is available), never changed in place. With a trained --bundle and data, test-split
accuracy and agreement with PyTorch are reported per backend. --threads N runs as if the machine had
N cores (CPU affinity), for comparing runs on a busy machine.
"""

from __future__ import annotations

import argparse
import io
import itertools
import os
import shutil
import sys
import tempfile
from functools import partial
from pathlib import Path

import numpy as np
from _common import latency_row, machine, print_table, time_calls, use_cores, xray_jpeg
from PIL import Image

from covid_xray.bundle import BundleConfig, read_config
from covid_xray.calibration import softmax
from covid_xray.data import DATA_ENV_VAR, discover
from covid_xray.export import export_bundle
from covid_xray.inference import Predictor


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bundle", help="a bundle from `covid-xray train` (default: untrained default backbone)")
    parser.add_argument("--data", help="dataset: test images to time, training images to calibrate int8 (default: $COVID_XRAY_DATA)")
    parser.add_argument("--threads", type=int, help="cores to use (default: all usable)")
    parser.add_argument("--seconds", type=float, default=3.0, help="minimum timed seconds per row")
    return parser.parse_args()


def untrained_bundle(path: Path, classes: list[str]) -> Path:
    from covid_xray.bundle import save_bundle
    from covid_xray.config import DEFAULT_BACKBONE
    from covid_xray.models import create_model, input_size

    model = create_model(DEFAULT_BACKBONE, len(classes), weights="imagenet")
    config = BundleConfig(backbone=DEFAULT_BACKBONE, classes=classes, input_size=input_size(DEFAULT_BACKBONE),
                          normalization=model.normalization())
    return save_bundle(path, model, config)


def test_images(data: Path | None, config: BundleConfig, count: int = 64) -> tuple[np.ndarray, np.ndarray | None]:
    """The test split at the model's input size, or random images without data (time does not depend on content)."""
    from covid_xray.data import discover
    from covid_xray.images import decode_samples

    size = config.input_size
    if data is None:
        rng = np.random.default_rng(0)
        return rng.integers(0, 256, (count, size, size), dtype=np.uint8), None
    decoded = decode_samples(discover(data)["test"], size)
    return decoded.images[:], np.array([s.label for s in decoded.samples])


def request_jpeg(data: Path | None) -> bytes:
    """A 1024×1024 JPEG as a client would send: a test X-ray scaled up, or a synthetic film without data.
    (A synthetic film is a near-tie for a trained model, which int8 hands to its fp32 fallback.)"""
    if data is None:
        return xray_jpeg(1024, 1024, "L")
    first = min(discover(data)["test"], key=lambda s: str(s.path)).path
    buf = io.BytesIO()
    Image.open(first).convert("L").resize((1024, 1024), Image.Resampling.BICUBIC).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def main() -> None:
    args = parse_args()
    use_cores(args.threads)
    data_arg = args.data or os.environ.get(DATA_ENV_VAR)
    data = Path(data_arg) if data_arg else None
    with tempfile.TemporaryDirectory() as tmp:
        if args.bundle:
            bundle = shutil.copytree(args.bundle, Path(tmp) / "model")
        else:
            classes = discover(data).classes if data else ["Covid", "Normal", "Viral Pneumonia"]
            bundle = untrained_bundle(Path(tmp) / "model", classes)
        config = export_bundle(bundle, int8=data is not None, data=data, log=lambda m: print(m, file=sys.stderr))
        backends = ["torch", "onnx"] + (["onnx-int8"] if "int8" in config.onnx else [])
        predictors = {b: Predictor.from_bundle(bundle, backend=b) for b in backends}
        images, labels = test_images(data, read_config(bundle))
        import torch

        print(f"{machine()}; torch {torch.__version__} with {torch.get_num_threads()} threads; "
              f"{config.backbone} at {config.input_size}×{config.input_size}; {len(images)} "
              f"{'test-split' if labels is not None else 'synthetic'} images", file=sys.stderr)

        names = {"torch": "PyTorch eager", "onnx": "ONNX Runtime fp32", "onnx-int8": "ONNX Runtime int8"}
        rows, speed = [], {}
        for backend, predictor in predictors.items():
            for batch in (1, 32):
                batches = itertools.cycle([images[i : i + batch] for i in range(0, len(images) - batch + 1, batch)])
                call = partial(lambda p, b: p.probabilities(next(b)), predictor, batches)
                seconds = time_calls(call, min_seconds=args.seconds)
                speed[backend, batch] = batch / seconds.mean()
                rows.append(latency_row(names[backend], seconds, batch))
        jpeg = request_jpeg(data)
        for backend, predictor in predictors.items():
            seconds = time_calls(partial(predictor.predict, [jpeg]), min_seconds=args.seconds)
            rows.append(latency_row(f"predict(1024² JPEG bytes), {backend}", seconds, 1))
        print("\nThroughput and latency per call\n")
        print_table(rows)

        eager = speed["torch", 1]
        print("\nSpeed-up over eager PyTorch at batch 1 (images/s ratio): " + ", ".join(
            f"{names[b]} batch {n}: {v / eager:.1f}×" for (b, n), v in speed.items() if b != "torch"))

        if labels is not None and args.bundle:
            print("\nOn the test split\n")
            print_table(quality_rows(predictors, images, labels))


def quality_rows(predictors: dict, images: np.ndarray, labels: np.ndarray) -> list[dict[str, str]]:
    """Accuracy and agreement with PyTorch; int8 also without its fp32 re-scoring of near-ties."""
    reference = predictors["torch"].probabilities(images)
    outputs = {b: p.probabilities(images) for b, p in predictors.items()}
    if "onnx-int8" in predictors:
        onnx = predictors["onnx-int8"].onnx
        onnx_margin, onnx.margin = onnx.margin, 0.0  # margin 0: nothing is re-scored
        outputs["onnx-int8 without fallback"] = softmax(onnx(images)[0], predictors["onnx-int8"].temperature)
        onnx.margin = onnx_margin
    return [
        {"backend": name, "accuracy": f"{(p.argmax(1) == labels).mean():.4f}",
         "same class as PyTorch": f"{(p.argmax(1) == reference.argmax(1)).mean():.1%}",
         "max Δprobability": f"{np.abs(p - reference).max():.1e}"}
        for name, p in outputs.items()
    ]


if __name__ == "__main__":
    main()
