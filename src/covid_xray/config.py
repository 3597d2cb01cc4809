"""Every training setting, defined once: its default, its help text and whether it may differ when a run
is resumed. `covid-xray train` and the SageMaker entry point generate their options from `TrainConfig`
(`add_train_options`), so the two cannot drift apart. Imports nothing heavy: the CLI reads it at start.
"""

from __future__ import annotations

import argparse
import dataclasses
import typing
from dataclasses import asdict, dataclass, field
from typing import Any

from .util import parse_bool

DEFAULT_BACKBONE = "tf_efficientnet_lite0"
# Chest films carry fine detail (interstitial patterns) that 224 px blurs: the default backbone is
# fine-tuned at 256 px (docs/experiments.md).
MIN_IMAGE_SIZE = 256
# How a dataset is split when it does not provide a split itself (data.discover, TrainConfig).
VAL_FRACTION = 0.15
TEST_FRACTION = 0.2
SPLIT_SEED = 0


_TODAY = object()


def setting(default: Any, help: str, *, resumable: bool = False, metavar: str | None = None,
            before: Any = _TODAY) -> Any:
    """A TrainConfig field. `resumable`: the setting may differ when `--resume` continues a checkpoint
    (it changes nothing about the weights trained so far). `before`: what a bundle made before the
    setting existed did, when that differs from today's default (so its splits are rebuilt as trained)."""
    return field(default=default, metadata={"help": help, "resumable": resumable, "metavar": metavar,
                                            "before": before})


@dataclass
class TrainConfig:
    backbone: str = setting(DEFAULT_BACKBONE, "any timm model name")
    weights: str = setting("imagenet", "imagenet | none | path to a state dict (.pth or .safetensors)",
                           metavar="WEIGHTS")
    # With early stopping; the strong zoom augmentation needs the epochs.
    epochs: int = setting(16, "most epochs of fine-tuning (early stopping may end sooner)")
    batch_size: int = setting(32, "images per step (the global batch under torchrun)")
    lr: float = setting(1e-3, "learning rate of the classifier head (the backbone gets lr × backbone-lr-scale)")
    backbone_lr_scale: float = setting(0.3, "the backbone's learning rate as a fraction of --lr")
    # 1.6% of the default backbone's weights, but skipping their backward pass halves a CPU step
    # (benchmarks/train_step.py). Never applied with weights "none": random filters would stay random.
    freeze_stride: int = setting(8, "keep the pretrained layers down to 1/S of the input resolution fixed "
                                    "(0 trains every layer)", metavar="S")
    weight_decay: float = setting(0.01, "AdamW weight decay")
    warmup_epochs: float = setting(1.0, "epochs of linear learning-rate warm-up before the cosine decay")
    label_smoothing: float = setting(0.1, "label smoothing of the cross-entropy loss")
    patience: int = setting(6, "early stopping: epochs without a validation improvement", resumable=True)
    # On a few dozen validation images an early, barely fine-tuned epoch can score the lowest loss by luck.
    min_epochs: int = setting(8, "no earlier epoch is selected or counts towards early stopping")
    seed: int = setting(0, "seed for initialisation, batch order and augmentation")
    split_seed: int = setting(SPLIT_SEED, "seed for carving the validation (and, when absent, test) splits")
    val_fraction: float = setting(VAL_FRACTION, "share of each source's training images carved off for validation")
    test_fraction: float = setting(TEST_FRACTION, "share carved off for testing when a source has no test split")
    image_size: int | None = setting(None, f"input size (default: the backbone's pretraining size, at least {MIN_IMAGE_SIZE})")
    # Chosen on the cross-site benchmark (docs/experiments.md, "Input-side candidates").
    drop_mislabelled: bool = setting(True, "leave out the files known to be mislabelled (covid_xray.known_labels: "
                                           "the Kaggle set's SARS figures filed as Covid)", before=False)
    texture_jitter: bool = setting(False, "augment with random resolution loss and JPEG compression, so that "
                                          "neither can stand in for the class")
    skip_bad_images: bool = setting(False, "skip unreadable files (counted in the report) instead of stopping")
    amp: bool = setting(True, "bfloat16 autocast on CPUs with native bf16, fp16/bf16 on GPUs (--no-amp: float32)")
    # oneDNN's bf16 backward of these convolutions is 2-5× slower than float32 (training.runtime).
    fp32_depthwise: bool = setting(True, "under bfloat16 on CPU, run the trainable 5×5 and stride-2 depthwise "
                                         "convolutions in float32: a third off each step on CPUs with AMX/AVX512-BF16")
    bootstrap: int = setting(1000, "bootstrap resamples for the confidence intervals", resumable=True)
    refer_sensitivity: float = setting(0.95, "Covid sensitivity (called Covid or referred) the referral threshold "
                                             "aims for on validation", resumable=True)
    onnx: bool = setting(True, "also write model.onnx (fast CPU inference) when the onnx extra is installed",
                         resumable=True)
    external: str | None = setting(None, "NAME=DIR: also evaluate the bundle on every labelled film of another site, "
                                         "reported next to the test split", resumable=True, metavar="NAME=DIR")
    holdout_source: str | None = setting(None, "train without this source and test on all its images (the other "
                                               "sources' test split is reported too, as test_in_sources)")

    def resume_key(self) -> dict[str, Any]:
        """The settings that must match for a checkpoint to be resumed."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if not f.metadata["resumable"]}

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TrainConfig:
        """Settings recorded in a bundle; ones it does not record (older bundles) take what such bundles did:
        today's default, or the setting's `before`."""
        fields = dataclasses.fields(cls)
        older = {f.name: f.metadata["before"] for f in fields if f.metadata["before"] is not _TODAY}
        return cls(**{**older, **{k: v for k, v in values.items() if k in {f.name for f in fields}}})


def setting_types() -> dict[str, type]:
    """Each setting's value type (`int | None` → int)."""
    hints = typing.get_type_hints(TrainConfig)
    types = {}
    for f in dataclasses.fields(TrainConfig):
        kinds = [t for t in typing.get_args(hints[f.name]) or (hints[f.name],) if t is not type(None)]
        types[f.name] = kinds[0]
    return types


def _hyperparameter_bool(value: str) -> bool:
    """SageMaker passes booleans as 'True'/'False' (str of the JSON-decoded value)."""
    parsed = parse_bool(value)
    if parsed is None:
        raise argparse.ArgumentTypeError(f"expected true or false, got {value!r}")
    return parsed


def add_train_options(parser: argparse.ArgumentParser, *, hyperparameters: bool = False) -> None:
    """One option per setting. For the CLI, booleans are `--name/--no-name` switches; as SageMaker
    hyperparameters every setting is `--name value` (booleans as true/false) and may also be spelt with
    underscores, as users of the SageMaker SDK write hyperparameter names either way."""
    defaults, types = TrainConfig(), setting_types()
    for f in dataclasses.fields(TrainConfig):
        kind = types[f.name]
        dashed = f.name.replace("_", "-")
        names = [f"--{dashed}"] + ([f"--{f.name}"] if hyperparameters and dashed != f.name else [])
        default = getattr(defaults, f.name)
        help = f.metadata["help"] + ("" if default is None else f" (default: {default})")
        if kind is bool and not hyperparameters:
            parser.add_argument(*names, dest=f.name, action=argparse.BooleanOptionalAction, default=default, help=help)
            continue
        metavar = f.metadata["metavar"] or ("NAME" if kind is str else kind.__name__.upper())
        parser.add_argument(*names, dest=f.name, type=_hyperparameter_bool if kind is bool else kind, default=default,
                            metavar=metavar, help=help)


def train_config(args: argparse.Namespace) -> TrainConfig:
    """The TrainConfig that options added by `add_train_options` describe."""
    return TrainConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)})
