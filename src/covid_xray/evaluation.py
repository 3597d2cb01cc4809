"""Evaluating a trained model on data, one path for the training job and `covid-xray evaluate`: the
dataset split as the bundle was trained, metrics per reported split, test metrics without the test images
that copy training or validation images (the audit finds them), per-source metrics, and the masked probe
(is the model looking at the lungs, or at what lies around them?).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from .audit import AuditReport
from .confounds import SizeConfound
from .calibration import expected_calibration_error, referral_summary
from .data import Dataset, Sample, discover, labelled_files, parse_sources
from .duplicates import leaked_test_paths
from .errors import DataError, ModelError
from .images import Decoded
from .metrics import compute_metrics, per_source_metrics

if TYPE_CHECKING:  # the bundle stage comes after this one; only its config type is needed here
    from .bundle import BundleConfig


def metrics_without_leaks(
    samples: list[Sample], probs: np.ndarray, report: AuditReport, *, n_boot: int = 1000, seed: int = 0
) -> dict[str, Any] | None:
    """Test metrics (as `metrics.compute_metrics`) on the images that are not copies of training or
    validation images, plus `excluded`: the paths left out. None when nothing would be left."""
    leaked = leaked_test_paths(report)
    keep = [i for i, s in enumerate(samples) if s.path not in leaked]
    if not keep:
        return None
    metrics = compute_metrics([samples[i].label for i in keep], probs[keep], report.classes, n_boot=n_boot, seed=seed)
    metrics["excluded"] = sorted(report.rel(s.path) for s in samples if s.path in leaked)
    return metrics


def lung_field_mask(size: int) -> np.ndarray:
    """True inside a centred ellipse spanning 84% of the width and height: it covers both lungs of a
    typical PA film and leaves out the corners (where text markers sit), the edges and the shoulders."""
    yy, xx = (np.mgrid[0:size, 0:size] + 0.5) / size
    return ((xx - 0.5) / 0.42) ** 2 + ((yy - 0.5) / 0.42) ** 2 <= 1.0


def masked_probe(predict: Callable[[np.ndarray], np.ndarray], images: np.ndarray, labels: list[int],
                 full: np.ndarray | None = None) -> dict[str, float]:
    """Accuracy on the images as they are, with the central lung field hidden, and with only it shown.

    `predict` maps uint8 N×S×S images to N×C probabilities (e.g. `Predictor.probabilities`); `full`, the
    probabilities of the images as they are, when already known. Hidden parts are filled with one grey,
    the mean over all the images: a per-image fill would carry each image's brightness, and so possibly
    its class, into the hidden part.
    """
    y = np.asarray(labels)
    inside = lung_field_mask(images.shape[-1])
    fill = np.uint8(round(float(images.mean())))
    probs = {
        "full": predict(images) if full is None else full,
        "centre_hidden": predict(np.where(inside, fill, images)),
        "centre_only": predict(np.where(inside, images, fill)),
    }
    result = {name: float((p.argmax(axis=1) == y).mean()) for name, p in probs.items()}
    result["majority_rate"] = float(np.bincount(y).max() / len(y))
    result["n"] = len(y)
    return result


def _restored(path: os.PathLike, width_height: tuple[int, int], size: int) -> np.ndarray:
    """The film as if its source had stored it at another size (resampled, saved losslessly), then
    preprocessed as training does."""
    import io

    from PIL import Image

    from .images import load_image

    buffer = io.BytesIO()
    Image.fromarray(load_image(path)).resize(width_height, Image.Resampling.BICUBIC).save(buffer, "PNG")
    return load_image(buffer.getvalue(), size)


def size_swap_probe(probabilities: Callable[[np.ndarray], np.ndarray], samples: list[Sample], classes: list[str],
                    confound: SizeConfound, size: int) -> dict[str, Any] | None:
    """Does the model read the class from a native size only that class has (`confounds.size_confounds`)?
    The source's test films are re-stored at the other size — that class's films at the others' size, the
    others' at its size — and predicted again: if the size or its resampling texture carries the class,
    that class's films lose it and the others gain it. None when the split has no such films."""
    films = [s for s in samples if s.source == confound.source]
    target = classes.index(confound.label)
    mine, others = [s for s in films if s.label == target], [s for s in films if s.label != target]
    if not mine or not others:
        return None
    to_other = tuple(int(v) for v in confound.other_size.split("×"))
    to_mine = tuple(int(v) for v in confound.size.split("×"))

    def called(group: list[Sample], restore_to: tuple[int, int] | None) -> float:
        from .images import load_image

        images = np.stack([load_image(s.path, size) if restore_to is None else _restored(s.path, restore_to, size)
                           for s in group])
        return round(float((probabilities(images).argmax(1) == target).mean()), 4)

    return {"source": confound.source, "class": confound.label, "size": confound.size,
            "other_size": confound.other_size, "n_class": len(mine), "n_others": len(others),
            "class_called_class": called(mine, None), "class_called_class_restored": called(mine, to_other),
            "others_called_class": called(others, None), "others_called_class_restored": called(others, to_mine)}


def trained_dataset(config: BundleConfig, data: str | os.PathLike | Sequence[str | os.PathLike] | None) -> Dataset:
    """The dataset split exactly as it was when this bundle was trained (same fractions, split seed,
    sources and held-out source), so "test" means the same images; refuses data whose classes or
    sources differ from the bundle's. `data`: `--data` value(s), NAME=PATH or PATH each."""
    hp = config.hyperparameters
    sources = parse_sources(data)
    trained = list(config.data.get("sources", {}))
    if len(trained) > 1 and sorted(trained) != sorted(s.name for s in sources):
        raise ModelError(f"the bundle was trained on sources {', '.join(trained)}; pass each again as --data NAME=PATH "
                         f"(got {', '.join(s.name for s in sources)})")
    dataset = discover(sources, val_fraction=hp.val_fraction, test_fraction=hp.test_fraction, split_seed=hp.split_seed,
                       holdout=hp.holdout_source, drop_mislabelled=hp.drop_mislabelled)
    if dataset.classes != config.classes:
        raise ModelError(f"the data's classes {dataset.classes} differ from the bundle's {config.classes}; "
                         f"use the data the model was trained on (--data)")
    return dataset


def split_test(test: Decoded, holdout: str | None) -> dict[str, Decoded]:
    """The test split as metrics report it. With a held-out source, "test" is that source alone (none of it
    was seen in training or model selection) and "test_in_sources" the test split of the sources trained
    on: the gap between the two is what a new hospital should expect to lose."""
    if not holdout:
        return {"test": test}
    held = [i for i, s in enumerate(test.samples) if s.source == holdout]
    rest = [i for i, s in enumerate(test.samples) if s.source != holdout]
    return {"test": test.subset(held), "test_in_sources": test.subset(rest)}


def evaluate_outputs(samples: dict[str, list[Sample]], probs: dict[str, np.ndarray], classes: list[str], *,
                     audit_report: AuditReport | None, multi_source: bool, n_boot: int, seed: int) -> dict[str, Any]:
    """The figures of metrics.json for the reported splits (`samples` and `probs` by split name): each
    split's metrics under its name; "test_dedup" without the test images that copy training/validation
    images (when an audit is given and some test image is left); with several sources, "per_source" on
    every source's test images (all images of a held-out one)."""
    metrics: dict[str, Any] = {
        split: compute_metrics([s.label for s in samples[split]], probs[split], classes, n_boot=n_boot, seed=seed)
        for split in samples
    }
    if "test" in samples and audit_report is not None:
        dedup = metrics_without_leaks(samples["test"], probs["test"], audit_report, n_boot=n_boot, seed=seed)
        if dedup:
            metrics["test_dedup"] = dedup
    if multi_source:
        splits = [s for s in ("test", "test_in_sources") if s in samples] or list(samples)
        metrics["per_source"] = per_source_metrics(
            [x.label for split in splits for x in samples[split]], np.concatenate([probs[split] for split in splits]),
            [x.source for split in splits for x in samples[split]], classes, n_boot=n_boot, seed=seed,
        )
    return metrics


def evaluate_bundle(config: BundleConfig, probabilities: Callable[[np.ndarray], np.ndarray],
                    data: str | os.PathLike | Sequence[str | os.PathLike] | None, split: str = "test", *,
                    skip_bad: bool = False, n_boot: int | None = None) -> dict[str, Any]:
    """`covid-xray evaluate`: a bundle's figures on one split of the data it was trained on, split as in
    training, with the same keys and (at the same bootstrap count and seed) the same numbers as the run's
    metrics.json. `probabilities` maps uint8 N×S×S images to calibrated N×C probabilities."""
    from .audit import audit_dataset
    from .images import decode_samples

    dataset = trained_dataset(config, data)
    decoded = decode_samples(dataset[split], config.input_size, skip_bad=skip_bad)
    reported = split_test(decoded, dataset.holdout) if split == "test" else {split: decoded}
    # Copies of training images in test inflate every metric: report the test split with and without them.
    report = audit_dataset(dataset, probe=False) if split == "test" else None
    hp = config.hyperparameters
    metrics = evaluate_outputs({name: d.samples for name, d in reported.items()},
                               {name: probabilities(d.images[:]) for name, d in reported.items()}, dataset.classes,
                               audit_report=report, multi_source=len(dataset.sources) > 1,
                               n_boot=hp.bootstrap if n_boot is None else n_boot, seed=hp.seed)
    metrics["skipped_images"] = decoded.bad
    return metrics


def external_samples(classes: list[str], data: str | os.PathLike | Sequence[str | os.PathLike] | None) -> list[Sample]:
    """Every labelled film of one site the bundle was not trained on, labelled with the bundle's class
    indices (`classes`); the site may lack a class, but a class the bundle does not know is refused."""
    sources = parse_sources(data, missing="give NAME=DIR, a labelled folder of another site's films (class "
                                          "folders, the Kaggle layout or a CSV manifest)")
    if len(sources) != 1:
        raise DataError("--external evaluates one labelled folder: pass one --data NAME=DIR")
    source = sources[0]
    files = labelled_files(source.path)
    index = {name: i for i, name in enumerate(classes)}
    unknown = sorted({label for _, label in files} - set(index))
    if unknown:
        raise DataError(f"{source.path} has classes the bundle does not know ({', '.join(unknown)}); the bundle's "
                        f"classes are {', '.join(classes)}: rename those folders (or manifest labels) to match")
    return [Sample(path, index[label], source.name) for path, label in files]


def evaluate_external(config: BundleConfig, assess: Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]],
                      data: str | os.PathLike | Sequence[str | os.PathLike] | None, *, skip_bad: bool = False,
                      n_boot: int | None = None) -> dict[str, Any]:
    """`covid-xray evaluate --external`: the bundle on every image of a labelled folder it was not trained
    on — the test split's metrics, calibration (ECE) and the referral table (share referred, accuracy of
    the rest, confidently wrong, Covid detected or referred). `assess` maps uint8 N×S×S images to
    calibrated probabilities and `refer` flags (`Predictor.assess`)."""
    from .images import decode_samples
    from .trust import covid_index

    samples = external_samples(config.classes, data)
    decoded = decode_samples(samples, config.input_size, skip_bad=skip_bad)
    if not decoded.samples:
        raise DataError("no readable image to evaluate")
    probs, referred = assess(decoded.images[:])
    labels = [s.label for s in decoded.samples]
    hp = config.hyperparameters
    return {
        "source": samples[0].source,
        "external": compute_metrics(labels, probs, config.classes, n_boot=hp.bootstrap if n_boot is None else n_boot,
                                    seed=hp.seed),
        "calibration": {"ece": round(expected_calibration_error(probs, labels), 4)},
        "referral": referral_summary(probs, labels, referred, covid_index(config.classes)),
        "skipped_images": decoded.bad,
    }
