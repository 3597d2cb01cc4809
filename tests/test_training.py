"""The fit loop itself: which epoch it keeps, when it stops, and the precision of its steps."""

from __future__ import annotations

import contextlib

import pytest
import torch
from _images import make_class_tree
from torch import nn

from covid_xray import data as data_mod
from covid_xray.images import decode_samples
from covid_xray.config import TrainConfig
from covid_xray.models import create_model
from covid_xray.runtime import slow_bf16_convs_in_fp32
from covid_xray.training import fit


@pytest.mark.integration
def test_no_epoch_before_min_epochs_is_selected_or_stops_the_run(tmp_path):
    dataset = data_mod.discover(make_class_tree(tmp_path / "data", per_class=10, size=48), val_fraction=0.2)
    train, val = (decode_samples(dataset[s], 48, cache_dir=tmp_path / "cache") for s in ("train", "val"))
    # Patience 0 alone would end the run before its first epoch: only min_epochs keeps it going.
    cfg = TrainConfig(weights="none", image_size=48, batch_size=4, epochs=5, patience=0, min_epochs=3, amp=False)
    (tmp_path / "run").mkdir()
    result = fit(create_model(cfg.backbone, 3, cfg.weights), train, val, cfg, tmp_path / "run", log=lambda m: None)

    eligible = [h for h in result.history if h["epoch"] >= 3]
    assert result.best_epoch >= 3 and len(result.history) >= 3
    assert result.best_val_loss == min(h["val_loss"] for h in eligible)


@pytest.mark.integration
def test_freeze_stride_keeps_the_early_pretrained_layers_fixed_and_trains_the_rest(tmp_path):
    dataset = data_mod.discover(make_class_tree(tmp_path / "data", per_class=6, size=48), val_fraction=0.2)
    train, val = (decode_samples(dataset[s], 48, cache_dir=tmp_path / "cache") for s in ("train", "val"))
    runs = {}
    for weights in ("imagenet", "none"):  # random filters are never frozen: they would stay random
        cfg = TrainConfig(weights=weights, image_size=48, batch_size=8, epochs=1, min_epochs=1, amp=False, freeze_stride=4)
        model = create_model(cfg.backbone, 3, cfg.weights)
        before = {name: p.detach().clone() for name, p in model.named_parameters()}
        (tmp_path / weights).mkdir()
        result = fit(model, train, val, cfg, tmp_path / weights, log=lambda m: None)
        runs[weights] = {name for name, p in model.named_parameters() if torch.equal(before[name], p)}
        assert result.frozen_parameters == sum(before[name].numel() for name in runs[weights])

    # tf_efficientnet_lite0 reaches 1/4 resolution at the end of its second stage (blocks.1).
    early = ("backbone.conv_stem.", "backbone.bn1.", "backbone.blocks.0.", "backbone.blocks.1.")
    assert runs["imagenet"] == {name for name in before if name.startswith(early)}
    assert runs["none"] == set()


def test_fp32_depthwise_runs_slow_depthwise_convs_in_float32_under_bf16_only_within_the_block():
    model = create_model("tf_efficientnet_lite0", 3, "none")
    outputs: dict[str, torch.dtype] = {}
    for name, module in model.named_modules():
        if isinstance(module, nn.Conv2d):
            module.register_forward_hook(lambda m, args, out, name=name: outputs.__setitem__(name, out.dtype))
    depthwise = {n: m for n, m in model.named_modules() if isinstance(m, nn.Conv2d) and 1 < m.groups == m.in_channels}
    slow = {n for n, m in depthwise.items() if m.kernel_size == (5, 5) or m.stride == (2, 2)}
    x = torch.randint(0, 256, (2, 1, 64, 64), dtype=torch.uint8)

    with torch.autocast("cpu", dtype=torch.bfloat16), slow_bf16_convs_in_fp32(model, torch.device("cpu")):
        model(x).sum().backward()
    assert len(slow) == 11 and len(depthwise) == 16  # lite0: 5×5 stages and stride-2 blocks
    assert {n for n, dtype in outputs.items() if dtype == torch.float32} == slow
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for n, p in model.named_parameters() if ".conv_dw" in n)

    for block in (contextlib.nullcontext(), slow_bf16_convs_in_fp32(model, torch.device("cpu"), enabled=False)):
        outputs.clear()
        with torch.autocast("cpu", dtype=torch.bfloat16), block:
            model(x)
        assert set(outputs.values()) == {torch.bfloat16}  # outside the block, or disabled, the model is as it was
    assert not any("forward" in vars(m) for m in model.modules())

    model.freeze(8)  # fixed layers have no weight gradient to speed up, and run faster in bf16
    trainable = {n for n in slow if model.get_submodule(n).weight.requires_grad}
    outputs.clear()
    with torch.autocast("cpu", dtype=torch.bfloat16), slow_bf16_convs_in_fp32(model, torch.device("cpu")):
        model(x)
    assert 0 < len(trainable) < len(slow)
    assert {n for n, dtype in outputs.items() if dtype == torch.float32} == trainable
