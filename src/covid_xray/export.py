"""`covid-xray export`: the bundle's model as ONNX graphs for ONNX Runtime on CPU.

The graph takes what `Predictor.preprocess` produces, uint8 N×1×S×S grayscale, and normalises inside
(XrayNet does), so every backend shares one definition of preprocessing; a uint8 input is also a
quarter of the bytes a float input would be. The int8 variant is static QDQ quantisation (int8
per-channel weights, uint8 activations) calibrated on training images only, never test images.
"""

from __future__ import annotations

import copy
import tempfile
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from .bundle import ONNX, ONNX_INT8, BundleConfig, add_files, load_bundle
from .errors import ModelError
from .calibration import softmax
from .inference import onnx_session

INPUT, OUTPUTS = "image", ("logits", "features")
CALIBRATION_IMAGES = 128
# Training images the calibration does not see, for measuring how far int8 drifts from fp32.
HELD_OUT_IMAGES = 64
# Probabilities from the fp32 graph must match PyTorch's to this; checked on every export.
PARITY_ATOL = 1e-4
# An int8 class can differ from fp32's only where the int8 top-2 margin is below 2 × the largest
# per-class probability error; 3 × the error seen on held-out images leaves headroom for new images.
FALLBACK_SAFETY = 3.0


def export_bundle(bundle: str | Path, *, int8: bool = False, data: str | Path | list[str] | None = None,
                  calibration_images: int = CALIBRATION_IMAGES, log=print) -> BundleConfig:
    """Write model.onnx (and model.int8.onnx) into the bundle and record them in config.json."""
    bundle = Path(bundle)
    model, config = load_bundle(bundle)
    size = config.input_size
    # Read calibration images first: a missing dataset should fail before minutes of work.
    train = _training_images(config, data, calibration_images + HELD_OUT_IMAGES) if int8 else None
    with tempfile.TemporaryDirectory(dir=bundle, prefix=".export-") as tmp:
        files = {ONNX: Path(tmp) / ONNX}
        export_checked(model, size, files[ONNX], log)
        info = graph_record(size)
        if train is not None:
            files[ONNX_INT8] = Path(tmp) / ONNX_INT8
            info["int8"] = _export_int8(files[ONNX], train, calibration_images, files[ONNX_INT8], log)
        # An int8 graph from an earlier export stays valid (same weights): keep its record.
        return add_files(bundle, files, {**config.onnx, **info})


def _export_int8(fp32: Path, train: np.ndarray, calibration_images: int, out: Path, log) -> dict[str, Any]:
    """Quantise, then measure the drift from fp32 on training images the calibration did not see."""
    calib, held = _split_calibration(train, calibration_images)
    _quantize(fp32, calib, out)
    drift = _max_probability_error(fp32, out, held)
    margin = min(1.0, FALLBACK_SAFETY * drift)
    log(f"{ONNX_INT8}: calibrated on {len(calib)} training images; max |probability difference| vs fp32 on "
        f"{len(held)} held-out training images {drift:.3f}; top-2 margins below {margin:.3f} are re-scored in fp32")
    return {
        "method": "static QDQ: int8 per-channel weights, uint8 activations, MinMax calibration",
        "calibration_images": len(calib),
        "held_out_max_probability_error": round(drift, 6),
        "fallback_margin": round(margin, 6),
    }


def export_checked(model, size: int, out: Path, log=print) -> None:
    """`model` as the fp32 graph `out`, checked against PyTorch (`graph_record` is what config.json keeps of it)."""
    export_onnx(model, size, out)
    log(f"{ONNX}: max |probability difference| vs PyTorch {_check_parity(model, out, size):.1e}")


def graph_record(size: int) -> dict[str, Any]:
    """config.json's `onnx` entry for an fp32 graph of input size `size`."""
    return {"input": f"{INPUT}: uint8 N×1×{size}×{size}",
            "outputs": "logits: float32 N×C; features: float32 N×D (penultimate, for the OOD guard)"}


def export_onnx(model, size: int, out: Path) -> None:
    """An XrayNet as one self-contained fp32 ONNX file: uint8 N×1×size×size in; logits and features out.

    TorchScript tracing with the padding made static, then onnxscript's optimiser (constant folding,
    batch-norm fused into the convolutions): 2 s, where the torch.export-based exporter took 11-20 s on
    two cores for a graph of the same nodes and speed (`benchmarks/user_wait.py` times the whole train)."""
    import onnx
    import onnxscript.optimizer
    import torch

    class WithFeatures(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = _static_same_padding(model, size)

        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            return self.model.forward_with_features(x)

    example = torch.zeros(2, 1, size, size, dtype=torch.uint8)
    batch = {name: {0: "batch"} for name in (INPUT, *OUTPUTS)}
    # The batch is dynamic; height and width stay fixed so ONNX Runtime can plan every layer ahead.
    with warnings.catch_warnings():  # the exporter's deprecation and constant-folding notes are noise to a user
        warnings.simplefilter("ignore")
        torch.onnx.export(WithFeatures().eval(), (example,), str(out), input_names=[INPUT], output_names=list(OUTPUTS),
                          dynamic_axes=batch, dynamo=False)
    onnx.save(onnxscript.optimizer.optimize(onnx.load(str(out))), str(out))


def _static_same_padding(model, size: int):
    """A copy of `model` whose TensorFlow-style 'same' convolutions pad by constants. timm's Conv2dSame
    computes its padding from the input's shape at every call, which a trace records as shape arithmetic
    (3× the nodes); for one input size, timm's export variant fixes the padding at its first call."""
    import torch
    from timm.layers.conv2d_same import Conv2dSame, Conv2dSameExport

    model = copy.deepcopy(model).eval()
    for module in model.modules():
        if type(module) is Conv2dSame:  # same weights and settings; only how the padding is found differs
            module.__class__ = Conv2dSameExport
            module.pad, module.pad_input_size = None, (0, 0)
    with torch.no_grad():
        model(torch.zeros(1, 1, size, size, dtype=torch.uint8))
    return model


def _probabilities(graph: Path, images: np.ndarray) -> np.ndarray:
    return softmax(onnx_session(graph).run(None, {INPUT: images[:, None]})[0])


def _check_parity(model, onnx_path: Path, size: int) -> float:
    from .models import predict_probs

    images = np.random.default_rng(0).integers(0, 256, (4, size, size), dtype=np.uint8)
    error = float(np.abs(_probabilities(onnx_path, images) - predict_probs(model, images)).max())
    if error > PARITY_ATOL:
        raise ModelError(f"the exported graph differs from PyTorch (max |probability difference| {error:.1e}); "
                         f"use --backend torch and report this backbone")
    return error


def _training_images(config: BundleConfig, data: str | Path | list[str] | None, count: int) -> np.ndarray:
    """Up to `count` images of the bundle's training split (spread over it, so every class is in)."""
    from .images import decode_samples
    from .evaluation import trained_dataset

    samples = trained_dataset(config, data)["train"]
    picked = [samples[int(i)] for i in np.linspace(0, len(samples) - 1, min(count, len(samples)))]
    return decode_samples(picked, config.input_size, skip_bad=True).images[:]


def _split_calibration(images: np.ndarray, count: int) -> tuple[np.ndarray, np.ndarray]:
    """Interleave, so calibration and held-out images both span every class."""
    held_every = max(2, round(len(images) / HELD_OUT_IMAGES))
    held = np.arange(len(images)) % held_every == 1
    return images[~held][:count], images[held]


def _quantize(fp32: Path, images: np.ndarray, out: Path) -> None:
    import onnx
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quant_pre_process,
        quantize_static,
    )

    class Batches(CalibrationDataReader):
        def __init__(self) -> None:
            self.batches = iter(images[i : i + 16, None] for i in range(0, len(images), 16))

        def get_next(self) -> dict[str, np.ndarray] | None:
            batch = next(self.batches, None)
            return None if batch is None else {INPUT: batch}

    prepared = out.with_name("prepared.onnx")
    quant_pre_process(str(fp32), str(prepared))  # shape inference + graph clean-up the quantiser expects
    nodes = onnx.load(str(prepared)).graph.node
    first_conv = next(i for i, n in enumerate(nodes) if n.op_type == "Conv")
    quantize_static(
        str(prepared), str(out), Batches(), quant_format=QuantFormat.QDQ, per_channel=True,
        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, calibrate_method=CalibrationMethod.MinMax,
        # The normalisation before the first convolution stays float: quantising it would round the
        # normalisation constants themselves, and the uint8 image already is the cheapest input.
        nodes_to_exclude=[n.name for n in nodes[:first_conv]],
    )
    prepared.unlink()


def _max_probability_error(fp32: Path, int8: Path, images: np.ndarray) -> float:
    if not len(images):
        raise ModelError("no training images left to check the int8 model on; the training split is too small")
    return float(np.abs(_probabilities(fp32, images) - _probabilities(int8, images)).max())
