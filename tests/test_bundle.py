"""The bundle round-trips exactly and refuses damaged files."""

from __future__ import annotations

import json

import pytest
from _images import encode, xray_like

from covid_xray.bundle import load_bundle
from covid_xray.errors import ModelError
from covid_xray.inference import Predictor
from covid_xray.ood import FILE as OOD_FILE


def test_round_trip_gives_identical_probabilities(untrained_bundle, tmp_path):
    from covid_xray.bundle import save_bundle

    model, config = load_bundle(untrained_bundle)
    guard = (untrained_bundle / OOD_FILE).read_bytes()
    copy = save_bundle(tmp_path / "copy", model, config, files={OOD_FILE: guard})
    images = [encode(xray_like(300, seed=i)) for i in range(4)]
    a = Predictor.from_bundle(untrained_bundle).predict(images)
    b = Predictor.from_bundle(copy).predict(images)
    assert a == b
    assert list(a[0]["probabilities"]) == ["Covid", "Normal", "Viral Pneumonia"]


def test_bundle_has_no_pickle_and_records_checksums(untrained_bundle):
    files = sorted(p.name for p in untrained_bundle.iterdir())
    assert files == ["config.json", "model.safetensors", OOD_FILE]
    config = json.loads((untrained_bundle / "config.json").read_text())
    assert len(config["files"]["model.safetensors"]) == 64 and len(config["files"][OOD_FILE]) == 64


def _copy(bundle, tmp_path):
    import shutil

    return shutil.copytree(bundle, tmp_path / "b")


def test_tampered_or_truncated_weights_are_refused(untrained_bundle, tmp_path):
    bundle = _copy(untrained_bundle, tmp_path)
    weights = bundle / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-10] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(ModelError, match="does not match the checksum"):
        load_bundle(bundle)
    weights.write_bytes(bytes(data[: len(data) // 2]))
    with pytest.raises(ModelError, match="truncated"):
        load_bundle(bundle)


def test_not_a_bundle(tmp_path):
    with pytest.raises(ModelError, match="not a model bundle"):
        load_bundle(tmp_path)


def test_a_tampered_ood_guard_is_refused(untrained_bundle, tmp_path):
    bundle = _copy(untrained_bundle, tmp_path)
    guard = bundle / OOD_FILE
    guard.write_bytes(guard.read_bytes()[:-8])
    with pytest.raises(ModelError, match="truncated or was modified"):
        Predictor.from_bundle(bundle)


def test_a_bundle_of_another_format_is_refused_with_what_to_do(untrained_bundle, tmp_path):
    bundle = _copy(untrained_bundle, tmp_path)
    config = json.loads((bundle / "config.json").read_text())
    (bundle / "config.json").write_text(json.dumps({**config, "format_version": 2}))
    with pytest.raises(ModelError, match="bundle format 2.*retrain with this version"):
        load_bundle(bundle)


def test_a_bundle_from_before_a_setting_existed_is_read_as_it_was_trained():
    from covid_xray.config import TrainConfig

    # Bundles made before --drop-mislabelled kept those files: `evaluate --data` must rebuild their splits so.
    assert TrainConfig.from_dict({"seed": 3}).drop_mislabelled is False
    assert TrainConfig.from_dict({"drop_mislabelled": True}).drop_mislabelled is True
    assert TrainConfig().drop_mislabelled is True and TrainConfig.from_dict({}).backbone == TrainConfig().backbone
