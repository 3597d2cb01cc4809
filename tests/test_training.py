"""The fit loop itself: which weights it validates and keeps."""

from __future__ import annotations

import copy

import torch
from conftest import make_class_tree

from covid_xray import data as data_mod
from covid_xray.models import create_model
from covid_xray.training import TrainConfig, fit


def _fit(tmp_path, ema_epochs: float):
    dataset = data_mod.discover(make_class_tree(tmp_path / "data", per_class=10, size=48), val_fraction=0.2)
    train, val = (data_mod.decode_samples(dataset[s], 48, cache_dir=tmp_path / "cache") for s in ("train", "val"))
    cfg = TrainConfig(weights="none", image_size=48, batch_size=4, epochs=2, patience=10, ema_epochs=ema_epochs, amp=False)
    torch.manual_seed(0)
    model = create_model(cfg.backbone, 3, cfg.weights)
    start = copy.deepcopy(model)
    (tmp_path / "run").mkdir()
    result = fit(model, train, val, cfg, tmp_path / "run", log=lambda m: None)
    return start, model, result


def _max_change(a: torch.nn.Module, b: torch.nn.Module) -> float:
    """Largest weight change in the backbone (the head is refitted before fine-tuning starts)."""
    head = {id(p) for p in a.head.parameters()}
    return max((pa - pb).abs().max().item() for pa, pb in zip(a.parameters(), b.parameters()) if id(pa) not in head)


def test_a_long_weight_average_keeps_the_backbone_near_its_starting_weights(tmp_path):
    start, plain, plain_result = _fit(tmp_path / "plain", ema_epochs=0)
    _, averaged, averaged_result = _fit(tmp_path / "averaged", ema_epochs=1e6)

    # Same batches, same updates: only what is validated and kept differs.
    assert [h["train_loss"] for h in plain_result["history"]] == [h["train_loss"] for h in averaged_result["history"]]
    assert _max_change(start, plain) > 1e-3
    assert _max_change(start, averaged) < 1e-5
