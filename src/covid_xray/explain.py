"""Grad-CAM: where in an X-ray the model looked for a class (pytorch-grad-cam on an `XrayNet`).

The layer to explain is found, not configured, so any timm backbone works: the last layer (in the
order the forward pass finishes them) whose output is a spatial map of the features the classifier
pools, in any layout (N×C×h×w, N×h×w×C, or a ViT's token sequence), and through which the class score
actually flows back. The last rule matters for ViTs that classify from the class token: their final
patch tokens do not reach the score at all, so the map comes from the last block's attention input.
"""

from __future__ import annotations

import base64
import io
import math
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import numpy as np
import torch
from PIL import Image
from torch import nn

from .errors import ModelError
from .models import XrayNet

# The page draws the heatmap over the X-ray with `mix-blend-mode: screen` at this opacity; `overlay`
# blends the same way so that a saved overlay looks like the page.
SCREEN_OPACITY = 0.55
COLORMAP = "inferno"  # black where there is no heat, so a screen blend leaves those pixels untouched

Reshape = Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class CamLayer:
    """The layer Grad-CAM explains, and how to read its output as a spatial map."""

    name: str  # module path inside the backbone, e.g. "bn2", "layer4", "blocks.11.norm1"
    module: nn.Module
    reshape: Reshape  # the layer's output (and its gradient) → N×C×h×w


def _nchw(t: torch.Tensor) -> torch.Tensor:
    return t


def _nhwc(t: torch.Tensor) -> torch.Tensor:
    return t.permute(0, 3, 1, 2)


def _tokens(t: torch.Tensor, prefix: int, grid: tuple[int, int]) -> torch.Tensor:
    return t[:, prefix:].unflatten(1, grid).permute(0, 3, 1, 2)


def _spatial_view(t: torch.Tensor, channels: int, prefix: int, hw: tuple[int, int]) -> Reshape | None:
    """How to read `t` (from a batch of one image) as a 1×channels×h×w map with h, w > 1; None when
    it is not one."""
    if t.shape[0] != 1:
        return None
    if t.ndim == 4 and t.shape[1] == channels and min(t.shape[2:]) > 1:
        return _nchw
    if t.ndim == 4 and t.shape[3] == channels and min(t.shape[1:3]) > 1:
        return _nhwc
    if t.ndim == 3 and t.shape[2] == channels:
        # Patch tokens after the class/register tokens, on a grid with the image's aspect ratio.
        n = t.shape[1] - prefix
        h = round(math.sqrt(n * hw[0] / hw[1])) if n > 0 else 0
        if h > 1 and n % h == 0 and n // h > 1:
            return partial(_tokens, prefix=prefix, grid=(h, n // h))
    return None


_layers: weakref.WeakKeyDictionary[nn.Module, dict[tuple[int, int], CamLayer]] = weakref.WeakKeyDictionary()


def target_layer(model: XrayNet, hw: tuple[int, int]) -> CamLayer:
    """The layer Grad-CAM explains for images of size `hw`; found once per model and size by one
    forward and backward pass on a noise image. Raises ModelError when no layer qualifies."""
    cached = _layers.setdefault(model, {})
    if hw not in cached:
        cached[hw] = _find_layer(model, hw)
    return cached[hw]


def _find_layer(model: XrayNet, hw: tuple[int, int]) -> CamLayer:
    backbone = model.backbone
    channels, prefix = backbone.num_features, getattr(backbone, "num_prefix_tokens", 0)
    seen: list[tuple[str, nn.Module, torch.Tensor, Reshape]] = []

    def record(name: str, module: nn.Module, inputs, output) -> None:
        if isinstance(output, torch.Tensor) and output.requires_grad:
            view = _spatial_view(output, channels, prefix, hw)
            if view is not None:
                output.retain_grad()
                seen.append((name, module, output, view))

    # Identity layers (e.g. a disabled norm) repeat their input: name the layer that computed it.
    handles = [m.register_forward_hook(partial(record, name)) for name, m in backbone.named_modules()
               if name and not isinstance(m, nn.Identity)]
    try:
        with torch.inference_mode(False), torch.enable_grad():
            noise = torch.rand((1, 1, *hw), generator=torch.Generator().manual_seed(0)) * 255
            model.eval()
            model(noise.to(next(model.parameters()).device).requires_grad_()).max().backward()
    finally:
        for handle in handles:
            handle.remove()
        model.zero_grad(set_to_none=True)
    for name, module, output, view in reversed(seen):
        if output.grad is not None and view(output.grad).count_nonzero() > 0:
            return CamLayer(name, module, view)
    raise ModelError(
        f"Grad-CAM does not support the {type(backbone).__name__} backbone: no layer outputs a spatial map "
        f"of its {channels} features that the class score depends on"
    )


def gradcam(model: XrayNet, image: np.ndarray, class_index: int | None = None) -> np.ndarray:
    """Grad-CAM of one image (H×W uint8, as `Predictor.preprocess` gives) for `class_index`
    (default: the predicted class): H×W float32 in [0, 1], highest where the evidence is.

    Puts the model in eval mode (BatchNorm statistics and dropout as in prediction) and enables
    gradients even inside `torch.inference_mode`. Not thread-safe: it hooks the model, and those
    hooks would also see other threads' forward passes.
    """
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    if image.ndim != 2:
        raise ValueError(f"expected one H×W grayscale image, got shape {image.shape}")
    layer = target_layer(model, image.shape)
    targets = None if class_index is None else [ClassifierOutputTarget(class_index)]
    with torch.inference_mode(False), torch.enable_grad():
        # A float input that requires grad: the score's gradient reaches the layer even when the
        # weights do not require grad.
        x = torch.tensor(image, dtype=torch.float32)[None, None].requires_grad_()
        cam = GradCAM(model.eval(), [layer.module], reshape_transform=layer.reshape)
        try:
            return cam(x, targets)[0]
        finally:
            # Not `with GradCAM(...)`: its __exit__ swallows IndexErrors. Drop the hooks and the
            # weights' gradients.
            cam.activations_and_grads.release()
            model.zero_grad(set_to_none=True)


def colorize(heatmap: np.ndarray) -> Image.Image:
    """The heatmap in colour (RGB), (near) black where it is 0."""
    from matplotlib import colormaps

    rgb = colormaps[COLORMAP](np.clip(heatmap, 0, 1))[..., :3]
    return Image.fromarray((rgb * 255).round().astype(np.uint8))


def overlay(image: np.ndarray, heatmap: np.ndarray, opacity: float = SCREEN_OPACITY) -> Image.Image:
    """The X-ray (H×W uint8) with the coloured heatmap screen-blended over it, as the web page shows it."""
    base = np.repeat(image[..., None].astype(np.float32) / 255, 3, axis=2)
    heat = np.asarray(colorize(heatmap), dtype=np.float32) / 255
    screen = base + heat - base * heat
    return Image.fromarray(((base + opacity * (screen - base)) * 255).round().astype(np.uint8))


def heatmap_png_b64(heatmap: np.ndarray) -> str:
    """The coloured heatmap as a base64 PNG: what the server returns for the page to draw."""
    buf = io.BytesIO()
    colorize(heatmap).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode("ascii")
