"""Shared fixtures: synthetic images made on the fly, a quick untrained bundle, and one real
training run on the dataset (session-scoped: trained once, reused by every test that needs it)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np
import pytest
from _images import encode, xray_like

DATA_ENV = "COVID_XRAY_DATA"
# Keep decoded-image caches of test runs (and their subprocesses) out of the user's ~/.cache.
os.environ.setdefault("COVID_XRAY_CACHE", tempfile.mkdtemp(prefix="covid-xray-cache-"))


@pytest.fixture(scope="session")
def dataset_dir() -> Path:
    value = os.environ.get(DATA_ENV)
    if not value:
        pytest.skip(f"{DATA_ENV} is not set: real-dataset tests skipped")
    return Path(value)


@pytest.fixture(scope="session")
def second_source(dataset_dir) -> Path:
    """radiography-dev, the second source: $COVID_XRAY_SECOND_DATA, else beside the Kaggle dataset."""
    path = Path(os.environ.get("COVID_XRAY_SECOND_DATA", dataset_dir.parent / "radiography-dev"))
    if not path.is_dir():
        pytest.skip(f"no second source at {path} (set COVID_XRAY_SECOND_DATA)")
    return path


@pytest.fixture(scope="session")
def untrained_bundle(tmp_path_factory) -> Path:
    """A real bundle (ImageNet backbone, random 3-class head) for protocol tests: fast, needs no data.
    Its out-of-distribution guard is fitted on synthetic X-ray-like images, as training would on real ones."""
    import torch

    from covid_xray.bundle import BundleConfig, save_bundle
    from covid_xray.calibration import refer, softmax
    from covid_xray.site_shift import Reference
    from covid_xray.models import create_model, predict_outputs
    from covid_xray.ood import FILE, OODGuard

    torch.manual_seed(0)
    model = create_model("tf_efficientnet_lite0", 3, weights="imagenet").eval()
    from covid_xray.images import load_image

    # Films at the sizes and formats the tests send, as training would see many scanners' films.
    films = np.stack([load_image(encode(xray_like(size, seed=1000 + i), fmt), 224)
                      for i in range(8) for size in (160, 256, 400) for fmt in ("JPEG", "PNG")])
    rng = np.random.default_rng(0)
    films = films[rng.permutation(len(films))]
    logits, features = predict_outputs(model, films)
    # Labels by film (an untrained model's "classes"), so that the class distance is fitted and applied too.
    guard = OODGuard.fit(features[:36], features[36:], np.arange(36) % 3, logits[36:].argmax(1))
    val, probs = features[36:], softmax(logits[36:])
    scores = guard.score(val, films[36:])
    referred = refer(probs, guard.flags(scores), 0.95, guard.classes.flags(guard.classes.score(val, probs.argmax(1))))
    site = Reference(n=len(val), referred=int(referred.sum()), scores=scores.tolist(),
                     class_mix={"Covid": 0.34, "Normal": 0.33, "Viral Pneumonia": 0.33})
    path = tmp_path_factory.mktemp("bundles") / "untrained"
    config = BundleConfig(
        backbone="tf_efficientnet_lite0",
        classes=["Covid", "Normal", "Viral Pneumonia"],
        input_size=224,
        normalization=model.normalization(),
        ood=guard.config(),
        referral={"threshold": 0.95},
        site_reference=site.to_dict(),
    )
    return save_bundle(path, model, config, files={FILE: guard.to_bytes()})


@pytest.fixture(scope="session")
def trained_run(dataset_dir, tmp_path_factory):
    """One default training run on the dataset (about 3 minutes on 2 cores), shared by all tests."""
    from covid_xray.config import TrainConfig
    from covid_xray.training import train_run

    out = tmp_path_factory.mktemp("run")
    # The default schedule (16 epochs, early stopping): a shorter one under-trains with the zoom
    # augmentation, and the trust tests should check what users get. Fewer bootstrap resamples only.
    return train_run(TrainConfig(bootstrap=200), dataset_dir, out, log=lambda m: None)
