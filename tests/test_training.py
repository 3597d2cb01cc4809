"""The fit loop itself: which epoch it keeps and when it stops."""

from __future__ import annotations

from conftest import make_class_tree

from covid_xray import data as data_mod
from covid_xray.models import create_model
from covid_xray.training import TrainConfig, fit


def test_no_epoch_before_min_epochs_is_selected_or_stops_the_run(tmp_path):
    dataset = data_mod.discover(make_class_tree(tmp_path / "data", per_class=10, size=48), val_fraction=0.2)
    train, val = (data_mod.decode_samples(dataset[s], 48, cache_dir=tmp_path / "cache") for s in ("train", "val"))
    # Patience 0 alone would end the run before its first epoch: only min_epochs keeps it going.
    cfg = TrainConfig(weights="none", image_size=48, batch_size=4, epochs=5, patience=0, min_epochs=3, amp=False)
    (tmp_path / "run").mkdir()
    result = fit(create_model(cfg.backbone, 3, cfg.weights), train, val, cfg, tmp_path / "run", log=lambda m: None)

    eligible = [h for h in result["history"] if h["epoch"] >= 3]
    assert result["best_epoch"] >= 3 and len(result["history"]) >= 3
    assert result["best_val_loss"] == min(h["val_loss"] for h in eligible)
