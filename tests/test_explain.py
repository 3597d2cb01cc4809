"""Grad-CAM: the layer found for each backbone family, maps that point at the evidence a trained
model uses, and the `explain` command and `?heatmap=true` on the endpoint."""

from __future__ import annotations

import base64
import io
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import timm
import torch
from _serving import wait_ready
from _images import encode, xray_like
from fastapi.testclient import TestClient
from PIL import Image
from torch import nn

from covid_xray.cli import main
from covid_xray.errors import ModelError
from covid_xray.explain import colorize, gradcam, heatmap_png_b64, overlay, target_layer
from covid_xray.inference import Predictor
from covid_xray.models import XrayNet
from covid_xray.server import create_app


def xray_net(backbone: str, num_classes: int = 3, **kw) -> XrayNet:
    torch.manual_seed(0)
    return XrayNet(timm.create_model(backbone, pretrained=False, num_classes=num_classes, **kw), (0.5,) * 3, (0.25,) * 3).eval()


def noise(shape: tuple[int, int], seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


# --- any timm backbone -------------------------------------------------------------------------


@pytest.mark.parametrize(("backbone", "kw", "layer"), [
    ("tf_efficientnet_lite0", {}, "bn2"),  # the default backbone: its last conv stage
    ("resnet18", {}, "layer4"),
    ("test_convnext", {}, "stages"),
    ("test_mambaout", {}, "stages"),  # N×h×w×C feature maps
    # A ViT that classifies from its class token: the last block's output never reaches the score
    # through the patch tokens, so the map comes from the block's input norm.
    ("test_vit", {"img_size": (64, 96)}, "blocks.5.norm1"),
])
def test_a_layer_is_found_for_each_backbone_family(backbone, kw, layer):
    model = xray_net(backbone, **kw)
    image = noise((64, 96))  # not square: height and width must not be swapped
    assert target_layer(model, image.shape).name == layer
    heat = gradcam(model, image)
    assert heat.shape == image.shape and heat.dtype == np.float32
    assert heat.min() >= 0 and heat.max() == pytest.approx(1, abs=1e-3)


def test_a_backbone_without_a_spatial_map_is_a_one_line_model_error():
    class PoolsFirst(nn.Module):
        num_features = 8

        def __init__(self):
            super().__init__()
            self.fc, self.head = nn.Linear(3, 8), nn.Linear(8, 3)

        def forward(self, x):
            return self.head(self.fc(x.mean(dim=(2, 3))))

    model = XrayNet(PoolsFirst(), (0.5,) * 3, (0.25,) * 3)
    with pytest.raises(ModelError, match="does not support the PoolsFirst backbone") as e:
        gradcam(model, noise((32, 32)))
    assert "\n" not in str(e.value)


def test_inference_mode_caller_gets_the_same_map_and_the_model_is_left_clean():
    model = xray_net("resnet18")
    image = noise((64, 64), seed=1)
    expected = gradcam(model, image, 2)
    with torch.inference_mode():  # as in the server's and the predictor's threads
        heat = gradcam(model, image, 2)
    np.testing.assert_allclose(heat, expected, atol=1e-5)
    assert not model.training
    assert all(not m._forward_hooks and not m._backward_hooks for m in model.modules())
    assert all(p.grad is None for p in model.parameters())


# --- the map points at the evidence ------------------------------------------------------------

SIZE, PATCH = 64, 12


def noisy(rng: np.random.Generator, patch_at: tuple[int, int] | None = None) -> np.ndarray:
    image = rng.normal(100, 25, (SIZE, SIZE))
    if patch_at is not None:
        row, col = patch_at
        image[row : row + PATCH, col : col + PATCH] += 100
    return np.clip(image, 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def patch_model() -> XrayNet:
    """Class 1 = a bright patch anywhere on noise, class 0 = noise only; trained in ~3 s on one core.
    Output stride 8 gives an 8×8 map: fine enough to tell where the patch is."""
    model = xray_net("test_resnet", num_classes=2, output_stride=8)
    rng = np.random.default_rng(0)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(40):
        labels = rng.integers(0, 2, 32)
        images = np.stack([noisy(rng, tuple(rng.integers(0, SIZE - PATCH, 2)) if y else None) for y in labels])
        loss = nn.functional.cross_entropy(model(torch.as_tensor(images)[:, None]), torch.as_tensor(labels))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval()


@pytest.mark.parametrize(("row", "col"), [(2, 2), (2, 50), (50, 2), (50, 50), (26, 26)])
def test_heat_lies_on_the_planted_patch_and_moves_with_it(patch_model, row, col):
    image = noisy(np.random.default_rng(row * 100 + col), (row, col))
    with torch.inference_mode():
        assert patch_model(torch.as_tensor(image)[None, None]).argmax().item() == 1
    heat = gradcam(patch_model, image)
    on_patch = np.zeros(heat.shape, bool)
    on_patch[row : row + PATCH, col : col + PATCH] = True
    assert heat[on_patch].mean() > 4 * heat[~on_patch].mean()
    # The hottest pixel is on the patch, give or take one cell of the 8×8 map.
    r, c = np.unravel_index(heat.argmax(), heat.shape)
    assert row - 8 <= r < row + PATCH + 8 and col - 8 <= c < col + PATCH + 8
    # The evidence for the other class ("noise only") is anywhere but on the patch.
    other = gradcam(patch_model, image, class_index=0)
    assert other[on_patch].mean() < other[~on_patch].mean()


# --- pictures ----------------------------------------------------------------------------------


def test_colour_heatmap_and_overlay_leave_cold_pixels_alone():
    image = np.asarray(xray_like(64))
    heat = np.zeros(image.shape, np.float32)
    heat[16:32, 16:32] = 1
    png = Image.open(io.BytesIO(base64.b64decode(heatmap_png_b64(heat))))
    assert png.format == "PNG" and png.mode == "RGB" and png.size == (64, 64)
    colours = np.asarray(png).astype(int)
    assert colours[0, 0].sum() < 10 and colours[20, 20].sum() > 500  # black where cold: invisible under `screen`
    np.testing.assert_array_equal(colours, np.asarray(colorize(heat)))
    blended = np.asarray(overlay(image, heat)).astype(int)
    assert blended.shape == (64, 64, 3)
    cold = heat == 0
    assert np.abs(blended[cold] - image[cold][:, None]).max() <= 3  # the X-ray itself where cold
    assert (blended[~cold] > image[~cold][:, None]).any(axis=1).all()  # screen only brightens


# --- the explain command -----------------------------------------------------------------------


def test_explain_writes_the_overlay_and_says_what_it_shows(untrained_bundle, tmp_path, capsys):
    image, out = tmp_path / "chest.png", tmp_path / "heat.png"
    xray_like(300).save(image)
    predictor = Predictor.from_bundle(untrained_bundle, backend="torch")
    expected = predictor.predict([image])[0]

    assert main(["explain", str(untrained_bundle), str(image), "-o", str(out)]) == 0
    printed = capsys.readouterr().out
    assert f"predicted: {expected['label']} (probability {expected['probabilities'][expected['label']]:.4f})" in printed
    assert f"heatmap: {out} (class {expected['label']}," in printed
    written = Image.open(out)
    assert written.format == "PNG" and written.mode == "RGB" and written.size == (224, 224)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["chest.png", "heat.png"]  # no temporary file left

    x = predictor.preprocess(image)
    assert np.asarray(written).tolist() == np.asarray(overlay(x, gradcam(predictor.model, x))).tolist()
    assert main(["explain", str(untrained_bundle), str(image), "-o", str(out), "--class", "Viral Pneumonia"]) == 0
    assert f"heatmap: {out} (class Viral Pneumonia," in capsys.readouterr().out


@pytest.mark.parametrize(("args", "says"), [
    (["--class", "covid"], "unknown class 'covid'; this bundle's classes are: Covid, Normal, Viral Pneumonia"),
    (["--image", "missing.png"], "missing.png: cannot read file"),
    (["-o", "no/such/dir/heat.png"], "cannot write no/such/dir/heat.png: No such file or directory"),
])
def test_explain_errors_are_one_line(untrained_bundle, tmp_path, monkeypatch, capsys, args, says):
    monkeypatch.chdir(tmp_path)
    xray_like(64).save("chest.png")
    options = dict(zip(args[::2], args[1::2]))
    image = options.pop("--image", "chest.png")
    argv = ["explain", str(untrained_bundle), image, "-o", options.pop("-o", "heat.png"), *sum(options.items(), ())]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("covid-xray: error: ") and says in err and err.count("\n") == 1
    assert not (tmp_path / "heat.png").exists()


# --- ?heatmap=true on the endpoint -------------------------------------------------------------


@pytest.fixture(scope="module")
def client(untrained_bundle):
    with TestClient(create_app(untrained_bundle)) as c:
        wait_ready(c)
        yield c


def post(client: TestClient, body: bytes, query: str = "", **headers):
    return client.post(f"/invocations{query}", content=body, headers={"content-type": "image/jpeg", **headers})


def png_pixels(b64: str) -> np.ndarray:
    png = Image.open(io.BytesIO(base64.b64decode(b64)))
    assert png.format == "PNG" and png.mode == "RGB"
    return np.asarray(png).astype(int)


def assert_same_predictions(got: list[dict], expected: list[dict]) -> None:
    """Same labels and probabilities, and heatmaps where `expected` has them, give or take float noise
    (how requests are grouped into batches varies)."""
    assert [p["label"] for p in got] == [p["label"] for p in expected]
    for g, e in zip(got, expected):
        np.testing.assert_allclose(list(g["probabilities"].values()), list(e["probabilities"].values()), atol=1e-4)
        if "heatmap" in e:
            assert np.abs(png_pixels(g["heatmap"]) - png_pixels(e["heatmap"])).max() <= 2


def test_heatmap_only_when_asked_and_it_is_the_predicted_class_map(client, untrained_bundle):
    jpeg = encode(xray_like(256, seed=5), "JPEG")
    plain = post(client, jpeg).json()["predictions"][0]
    assert "heatmap" not in plain
    assert "heatmap" not in post(client, jpeg, "?heatmap=false").json()["predictions"][0]

    predictor = Predictor.from_bundle(untrained_bundle)
    x = predictor.preprocess(jpeg)
    expected = np.asarray(colorize(gradcam(predictor.model, x, predictor.classes.index(plain["label"])))).astype(int)
    for query, headers in [("?heatmap=true", {}), ("?heatmap=1", {}), ("", {"X-Heatmap": "True"})]:
        prediction = post(client, jpeg, query, **headers).json()["predictions"][0]
        assert_same_predictions([prediction], [plain])
        heat = png_pixels(prediction["heatmap"])
        assert heat.shape == expected.shape and np.abs(heat - expected).max() <= 2


def test_each_instance_gets_its_heatmap_and_other_requests_do_not_disturb_it(client):
    images = [encode(xray_like(200, seed=s), "PNG") for s in range(3)]
    document = {"instances": [{"b64": base64.b64encode(i).decode()} for i in images]}

    def explained() -> list[dict]:
        return client.post("/invocations?heatmap=true", json=document).json()["predictions"]

    def plain() -> list[dict]:
        return client.post("/invocations", json={"instances": document["instances"] * 2}).json()["predictions"]

    expected, expected_plain = explained(), plain()
    assert len({p["heatmap"] for p in expected}) == 3
    assert_same_predictions(expected, expected_plain[:3])
    # Grad-CAM hooks the model it explains: forward passes of concurrent requests must not reach it.
    with ThreadPoolExecutor(4) as pool:
        heatmaps = [pool.submit(explained) for _ in range(4)]
        others = [pool.submit(plain) for _ in range(8)]
        for other in others:
            assert_same_predictions(other.result(), expected_plain)
        for result in heatmaps:
            assert_same_predictions(result.result(), expected)


@pytest.mark.parametrize(("query", "headers", "says"), [
    ("?heatmap=yes please", {}, "query parameter heatmap must be true or false, not 'yes please'"),
    ("", {"X-Heatmap": "maybe"}, "header X-Heatmap must be true or false, not 'maybe'"),
])
def test_bad_heatmap_flag_is_a_400(client, query, headers, says):
    r = post(client, encode(xray_like(64), "JPEG"), query, **headers)
    assert r.status_code == 400 and r.json() == {"error": says}
