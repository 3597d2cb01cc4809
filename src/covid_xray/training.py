"""Fine-tuning: head warm-up on cached features, then full fine-tuning with early stopping.

`train_run` is the `covid-xray train` job (and the SageMaker entry point's): data → model → fit →
evaluate on the untouched test split → bundle, metrics.json, report.md and plots in the run folder.
"""

from __future__ import annotations

import json
import math
import os
import random
import time
import types
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from . import audit, evaluation, model_card, ood
from . import data as data_mod
from .bundle import save_bundle
from .errors import CovidXrayError
from .models import DEFAULT_BACKBONE, XrayNet, create_model, input_size, predict_outputs, predict_probs

CHECKPOINT = "checkpoint.pt"
# Chest films carry fine detail (interstitial patterns) that 224 px blurs: fine-tuning the default
# backbone at 256 px raised mean test accuracy over three seeds from 0.950 to 0.980, for 1.5× the time.
MIN_IMAGE_SIZE = 256


@dataclass
class TrainConfig:
    backbone: str = DEFAULT_BACKBONE
    weights: str = "imagenet"
    epochs: int = 16  # with early stopping (patience 6); the stronger zoom augmentation needs the extra epochs
    batch_size: int = 32
    lr: float = 1e-3  # classifier head; the backbone gets lr * backbone_lr_scale
    backbone_lr_scale: float = 0.3
    # The stem and the layers down to 1/8 of the input resolution keep their pretrained weights (0: train all):
    # 1.6% of the default backbone's weights, but skipping their backward pass halves a CPU training step
    # (benchmarks/train_step.py). Never applied with weights "none": random filters would stay random.
    freeze_stride: int = 8
    weight_decay: float = 0.01
    warmup_epochs: float = 1.0
    label_smoothing: float = 0.1
    patience: int = 6
    # No epoch before this one is selected or counts towards early stopping: on 38 validation images an
    # early, barely fine-tuned epoch can score the lowest loss by luck (seed 4 selected epoch 3 of 9).
    min_epochs: int = 8
    seed: int = 0
    split_seed: int = 0
    val_fraction: float = 0.15
    test_fraction: float = 0.2
    image_size: int | None = None  # None: the backbone's pretraining resolution, at least MIN_IMAGE_SIZE
    skip_bad_images: bool = False
    amp: bool = True  # bfloat16 autocast on CPUs with native bf16, fp16/bf16 on GPUs
    # The trainable 5×5 and stride-2 depthwise convolutions run in float32 under bf16 autocast on CPU (see
    # slow_bf16_convs_in_fp32): a third off a default step. Chosen on the carved split by a rule set in
    # advance (docs/experiments.md).
    fp32_depthwise: bool = True
    bootstrap: int = 1000
    refer_sensitivity: float = 0.95  # Covid sensitivity (detected or referred) the referral threshold aims for
    onnx: bool = True  # also write model.onnx (fast CPU inference) when the onnx extra is installed
    holdout_source: str | None = None  # a source never trained on: all its images are the test split
    extra: dict[str, Any] = field(default_factory=dict)

    def resolved_size(self) -> int:
        return self.image_size or max(MIN_IMAGE_SIZE, input_size(self.backbone))


def onnx_available() -> bool:
    import importlib.util

    return all(importlib.util.find_spec(m) for m in ("onnx", "onnxruntime", "onnxscript"))


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def cpu_has_bf16() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


@dataclass(frozen=True)
class Distributed:
    """Where this process stands in a torchrun job (rank 0 of 1 when run plainly)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    @classmethod
    def from_env(cls) -> Distributed:
        """Join the process group torchrun describes in the environment (gloo on CPU, nccl on GPU)."""
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world <= 1:
            return cls()
        import torch.distributed as dist

        if not dist.is_initialized():
            dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        return cls(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))

    def gather_probs(self, model: nn.Module, images) -> np.ndarray:
        """Probabilities for the whole split: each rank predicts every world-th image, then all share."""
        if self.world == 1:
            return predict_probs(model, images)
        import torch.distributed as dist

        index = np.arange(self.rank, len(images), self.world)
        mine = predict_probs(model, np.stack([images[int(i)] for i in index]) if len(index) else images[0:0])
        parts: list[Any] = [None] * self.world
        dist.all_gather_object(parts, (index, mine))
        probs = np.zeros((len(images), mine.shape[1]), np.float32)
        for idx, p in parts:
            probs[idx] = p
        return probs

    def close(self) -> None:
        if self.world > 1:
            import torch.distributed as dist

            dist.barrier()
            dist.destroy_process_group()


def pick_device(dist: Distributed = Distributed()) -> torch.device:
    return torch.device(f"cuda:{dist.local_rank}") if torch.cuda.is_available() else torch.device("cpu")


def autocast(device: torch.device, enabled: bool):
    if device.type == "cuda":
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.autocast("cuda", dtype=dtype, enabled=enabled)
    return torch.autocast("cpu", dtype=torch.bfloat16, enabled=enabled and cpu_has_bf16())


def _fp32_forward(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    with torch.autocast("cpu", enabled=False):
        return type(conv).forward(conv, x.float())


@contextmanager
def slow_bf16_convs_in_fp32(model: nn.Module, device: torch.device, enabled: bool = True) -> Iterator[None]:
    """Within this block, on CPU, run the trainable depthwise convolutions with a 5×5 kernel or stride 2 in
    float32 under bf16 autocast: oneDNN's bf16 backward for those is 2–5× slower than float32 and took over
    half of a training step, while its other bf16 kernels are fast (`python benchmarks/train_step.py`).
    Frozen ones stay in bf16: they have no weight gradient, and their forward pass is faster in bf16.
    With enabled=False, or off the CPU, the block changes nothing."""
    convs = [] if not enabled or device.type != "cpu" else [
        m for m in model.modules()
        if isinstance(m, nn.Conv2d) and 1 < m.groups == m.in_channels and (max(m.kernel_size) > 3 or max(m.stride) > 1)
        and m.weight.requires_grad
    ]
    for conv in convs:
        conv.forward = types.MethodType(_fp32_forward, conv)
    try:
        yield
    finally:
        for conv in convs:
            del conv.forward


def class_weights(labels: list[int], n_classes: int) -> torch.Tensor:
    """Inverse-frequency weights (mean 1) so the loss does not favour the largest class."""
    counts = np.bincount(labels, minlength=n_classes).astype(float)
    weights = counts.sum() / (n_classes * np.maximum(counts, 1))
    return torch.tensor(weights, dtype=torch.float32)


def warmup_cosine(total_steps: int, warmup_steps: int):
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))

    return factor


def train_mode(model: nn.Module) -> None:
    """Train, but keep BatchNorm on its pretrained running statistics: with a few hundred images and
    small batches, batch statistics are noisy and would shift the features the warmed-up head expects."""
    model.train()
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.eval()


def _save_atomic(obj: dict[str, Any], path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


@torch.no_grad()
def _features(model: XrayNet, images: np.ndarray, device, amp: bool, batch_size: int = 64) -> torch.Tensor:
    model.eval()
    out = []
    for start in range(0, len(images), batch_size):
        x = torch.from_numpy(images[start : start + batch_size]).unsqueeze(1).to(device)
        with autocast(device, amp):
            out.append(model.features(x).float())
    return torch.cat(out)


def warm_up_head(model: XrayNet, images: np.ndarray, labels: list[int], cfg: TrainConfig, device, loss_fn) -> None:
    """Fit the new classifier on frozen features first, so fine-tuning starts from a sensible head
    instead of pushing random-head gradients into the pretrained backbone."""
    feats = _features(model, images, device, cfg.amp)
    y = torch.as_tensor(labels, device=device)
    head = model.head
    opt = torch.optim.AdamW(head.parameters(), lr=1e-2, weight_decay=cfg.weight_decay)
    for _ in range(200):  # full-batch steps on cached features: a fraction of a second
        opt.zero_grad()
        loss_fn(head(feats), y).backward()
        opt.step()


def fit(
    model: XrayNet,
    train: data_mod.Decoded,
    val: data_mod.Decoded,
    cfg: TrainConfig,
    run_dir: Path,
    *,
    resume: bool = False,
    dist: Distributed = Distributed(),
    log=print,
) -> dict[str, Any]:
    """Train with AdamW, warm-up + cosine, label smoothing and class weights; keep the epoch with
    the lowest validation loss from `min_epochs` on; checkpoint every epoch. Returns the history and best epoch.

    Under torchrun every rank trains on its share of each epoch (DistributedSampler, DDP) with the
    global batch size unchanged; validation covers the whole split on every rank, so all ranks make
    the same early-stopping decision; only rank 0 writes checkpoints."""
    from torch.nn.parallel import DistributedDataParallel
    from tqdm.auto import tqdm

    device = pick_device(dist)
    model.to(device).to(memory_format=torch.channels_last)
    n_classes = model.head.out_features
    train_labels = [s.label for s in train.samples]
    val_labels = np.array([s.label for s in val.samples])
    loss_fn = nn.CrossEntropyLoss(weight=class_weights(train_labels, n_classes).to(device), label_smoothing=cfg.label_smoothing)

    head_params = list(model.head.parameters())
    head_ids = {id(p) for p in head_params}
    frozen = model.freeze(cfg.freeze_stride if cfg.weights != "none" else 0)
    if frozen:
        log(f"keeping {frozen:,} pretrained parameters fixed (layers down to 1/{cfg.freeze_stride} resolution; "
            "--freeze-stride 0 trains all)")
    backbone_params = [p for p in model.parameters() if id(p) not in head_ids and p.requires_grad]
    optimizer = torch.optim.AdamW(
        [{"params": backbone_params, "lr": cfg.lr * cfg.backbone_lr_scale}, {"params": head_params, "lr": cfg.lr}],
        weight_decay=cfg.weight_decay,
    )
    batch_size = max(1, cfg.batch_size // dist.world)  # per rank: same global batch as one process
    steps_per_epoch = math.ceil(len(train_labels) / (batch_size * dist.world))
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, warmup_cosine(cfg.epochs * steps_per_epoch, max(1, int(cfg.warmup_epochs * steps_per_epoch)))
    )
    dataset = data_mod.ImageTensors(train.images, train_labels, data_mod.augmentation(cfg.resolved_size()))
    sampler = torch.utils.data.DistributedSampler(dataset, dist.world, dist.rank, shuffle=True, seed=cfg.seed)

    state: dict[str, Any] = {"epoch": 0, "history": [], "best_epoch": 0, "best_val_loss": float("inf"), "best_state": None}
    checkpoint = run_dir / CHECKPOINT
    if resume and checkpoint.is_file():
        saved = torch.load(checkpoint, map_location=device, weights_only=True)
        if saved["config"] != _resume_key(cfg):
            raise CovidXrayError(f"{checkpoint} was made with different settings; use the same ones or a new --out")
        model.load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optimizer"])
        scheduler.load_state_dict(saved["scheduler"])
        state = saved["state"]
        log(f"resuming after epoch {state['epoch']} from {checkpoint}")
    else:
        warm_up_head(model, train.images, train_labels, cfg, device, loss_fn)  # identical on every rank
    net = DistributedDataParallel(model) if dist.world > 1 else model

    first_eligible = min(cfg.min_epochs, cfg.epochs)
    epochs_without_improvement = state["epoch"] - state["best_epoch"] if state["best_epoch"] else 0
    quiet = not dist.main
    bar = tqdm(range(state["epoch"] + 1, cfg.epochs + 1), desc="epochs", unit="epoch", dynamic_ncols=True, disable=quiet)
    for epoch in bar:
        if epoch > first_eligible and epochs_without_improvement >= cfg.patience:
            log(f"early stopping: no validation improvement for {cfg.patience} epochs")
            break
        # Re-seeding per epoch makes a resumed run replay exactly the batches and augmentations it would have.
        seed_everything(cfg.seed * 1000 + epoch + 7919 * dist.rank)
        sampler.set_epoch(epoch)
        loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, sampler=sampler)
        train_mode(net)
        total, seen = 0.0, 0
        for x, y in tqdm(loader, desc=f"epoch {epoch}", leave=False, unit="batch", dynamic_ncols=True, disable=quiet):
            x, y = x.to(device), y.to(device)
            with autocast(device, cfg.amp), slow_bf16_convs_in_fp32(model, device, cfg.fp32_depthwise):
                loss = loss_fn(net(x), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            total += loss.item() * len(y)
            seen += len(y)
        probs = dist.gather_probs(model, val.images)
        val_loss = float(-np.log(np.clip(probs[np.arange(len(val_labels)), val_labels], 1e-7, 1)).mean())
        val_acc = float((probs.argmax(1) == val_labels).mean())
        state["history"].append({"epoch": epoch, "train_loss": total / seen, "val_loss": val_loss, "val_accuracy": val_acc})
        state["epoch"] = epoch
        if epoch >= first_eligible:
            if val_loss < state["best_val_loss"] - 1e-4:
                state.update(best_epoch=epoch, best_val_loss=val_loss,
                             best_state={k: v.detach().clone() for k, v in model.state_dict().items()})
                epochs_without_improvement = 0
            else:
                epochs_without_improvement += 1
        bar.set_postfix(loss=f"{total / seen:.3f}", val_loss=f"{val_loss:.3f}", val_acc=f"{val_acc:.3f}")
        if dist.main:
            _save_atomic(
                {"config": _resume_key(cfg), "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                 "scheduler": scheduler.state_dict(), "state": state},
                checkpoint,
            )
    bar.close()
    if state["best_state"] is not None:
        model.load_state_dict(state["best_state"])
    return {"history": state["history"], "best_epoch": state["best_epoch"], "best_val_loss": state["best_val_loss"],
            "frozen_parameters": frozen}


def _frozen_note(frozen: int, hp: dict[str, Any]) -> str:
    return f" with {frozen:,} pretrained parameters fixed (down to 1/{hp['freeze_stride']} resolution)" if frozen else " of every layer"


def _resume_key(cfg: TrainConfig) -> dict[str, Any]:
    """Settings that must match for a checkpoint to be resumed."""
    return {k: v for k, v in asdict(cfg).items() if k not in ("patience", "bootstrap", "refer_sensitivity", "onnx", "extra")}


def train_run(
    cfg: TrainConfig, data_dir: str | os.PathLike | Sequence[data_mod.Source], out_dir: str | os.PathLike, *,
    resume: bool = False, log=print,
) -> dict[str, Any]:
    """The whole training job. Writes RUN/model (the bundle), metrics.json, report.md, plots, splits.csv.

    Under torchrun, all ranks train; rank 0 alone evaluates and writes. Other ranks return {}."""
    started = time.time()
    dist = Distributed.from_env()
    if not dist.main:
        log = lambda message: None
    run_dir = Path(out_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    seed_everything(cfg.seed)
    size = cfg.resolved_size()

    dataset = data_mod.discover(
        data_dir, val_fraction=cfg.val_fraction, test_fraction=cfg.test_fraction, split_seed=cfg.split_seed,
        holdout=cfg.holdout_source,
    )
    log(f"data: {dataset.layout} layout, classes {dataset.classes}, " + ", ".join(f"{s} {len(dataset[s])}" for s in data_mod.SPLITS)
        + _sources_line(dataset))
    if dist.main:  # the audit and every file the run writes are rank 0's job
        dataset.write_splits_csv(run_dir / "splits.csv")
        audit_report = audit.audit_dataset(dataset, seed=cfg.seed)
        (run_dir / "audit.json").write_text(json.dumps(audit_report.to_dict(), indent=2))
        leaked = audit.leaked_test_paths(audit_report)
        if leaked:
            log(f"warning: {len(leaked)} test images are exact or near copies of training/validation images; "
                "test metrics are reported with and without them (audit.json lists them)")
        if audit_report.source_mix and audit_report.source_mix.verdict != "none":
            log(f"warning: {audit.source_mix_explanation(audit_report.source_mix)}")
    decoded = {s: data_mod.decode_samples(dataset[s], size, skip_bad=cfg.skip_bad_images) for s in data_mod.SPLITS}
    bad = [reason for d in decoded.values() for reason in d.bad]
    for reason in bad:
        log(f"skipped unreadable image: {reason}")

    model = create_model(cfg.backbone, len(dataset.classes), cfg.weights)
    fit_result = fit(model, decoded["train"], decoded["val"], cfg, run_dir, resume=resume, dist=dist, log=log)
    dist.close()
    if not dist.main:
        return {}
    model.cpu()

    reported = _reported_splits(decoded, dataset.holdout)
    outputs = {"train": decoded["train"], **reported}
    labels = {split: [sample.label for sample in d.samples] for split, d in outputs.items()}
    logits, features = {}, {}
    for split, d in outputs.items():
        logits[split], features[split] = predict_outputs(model, d.images)
    outliers = np.concatenate(list(ood.synthetic_outliers(size).values()))
    trust = fit_trust(logits, features, {split: d.images for split, d in outputs.items()}, labels, dataset.classes, cfg,
                      (outliers, predict_outputs(model, outliers)[1]))
    metrics: dict[str, Any] = {}
    plots = []
    probs = {}
    for split in reported:
        probs[split] = evaluation.softmax(logits[split], trust["temperature"])
        metrics[split] = evaluation.compute_metrics(labels[split], probs[split], dataset.classes, n_boot=cfg.bootstrap, seed=cfg.seed)
        plots += evaluation.write_plots(run_dir, split, labels[split], probs[split], dataset.classes, metrics[split])
    metrics.update(trust["metrics"])
    evaluation.plot_reliability(logits["test"], labels["test"], trust["temperature"], run_dir / "reliability_test.png",
                                "Reliability (test)")
    plots.append("reliability_test.png")
    if len(dataset.sources) > 1:
        metrics["per_source"] = _per_source_metrics(reported, probs, dataset.classes, cfg)
    test_dedup = audit.metrics_without_leaks(
        reported["test"].samples, probs["test"], audit_report, n_boot=cfg.bootstrap, seed=cfg.seed
    )
    if test_dedup:
        metrics["test_dedup"] = test_dedup
    metrics["test_masked"] = audit.masked_probe(
        lambda images: predict_probs(model, images), reported["test"].images[:], [s.label for s in reported["test"].samples]
    )
    evaluation.plot_learning_curves(fit_result["history"], fit_result["best_epoch"], run_dir / "learning_curves.png")
    plots.append("learning_curves.png")

    elapsed = time.time() - started
    data_info = {
        "layout": dataset.layout,
        "carved_splits": dataset.carved,
        "counts": {s: len(decoded[s].samples) for s in data_mod.SPLITS},
        "skipped_images": bad,
        "audit": {
            "exact_duplicate_groups": len(audit_report.exact_groups),
            "near_duplicate_pairs": len(audit_report.near_pairs),
            "leaked_test_images": len(leaked),
            "metadata_probe": audit_report.probe.to_dict() if audit_report.probe else None,
            "class_by_source": audit_report.source_mix.to_dict() if audit_report.source_mix else None,
        },
        "sources": _source_info(dataset, decoded),
        "holdout_source": dataset.holdout,
        "fingerprint": data_mod.fingerprint(
            {s: decoded[s].digests for s in data_mod.SPLITS}, dataset.classes, {s: decoded[s].samples for s in data_mod.SPLITS}
        ),
    }
    config = {
        "backbone": cfg.backbone,
        "classes": dataset.classes,
        "input_size": size,
        "input": "grayscale uint8, N×1×H×W; normalisation inside the model",
        "normalization": model.normalization(),
        "hyperparameters": asdict(cfg),
        "training": {
            "best_epoch": fit_result["best_epoch"], "epochs_run": len(fit_result["history"]),
            "frozen_parameters": fit_result["frozen_parameters"],
            "seconds": round(elapsed, 1), "processes": dist.world,
        },
        "data": data_info,
        "metrics": {
            split: {"accuracy": metrics[split]["accuracy"], "macro_auc": metrics[split]["macro_auc"], "n": metrics[split]["n"]}
            for split in ("val", "test", "test_in_sources", "test_dedup") if split in metrics
        },
        **trust["config"],
    }
    card = model_card.render(config, metrics, audit_report)
    save_bundle(run_dir / "model", model, config, files={ood.FILE: trust["guard"].to_bytes(), model_card.FILE: card})
    if cfg.onnx and onnx_available():
        from .export import export_bundle

        export_bundle(run_dir / "model", log=log)
    (run_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
    report = write_report(run_dir, config, metrics, fit_result, plots, audit_report)
    (run_dir / CHECKPOINT).unlink(missing_ok=True)  # the run is complete; the bundle holds the result
    lines = evaluation.summary_lines(metrics["test"], "test")
    for split in ("test_in_sources", "test_dedup"):
        if split in metrics:
            lines += evaluation.summary_lines(metrics[split], split)
    for line in lines + [f"train_seconds={elapsed:.1f}"]:
        log(line)
    return {"run_dir": run_dir, "report": report, "metrics": metrics, "config": config}


def covid_index(classes: list[str]) -> int | None:
    return next((i for i, c in enumerate(classes) if c.lower().startswith("covid")), None)


def fit_trust(logits: dict[str, np.ndarray], features: dict[str, np.ndarray], images: dict[str, Any],
              labels: dict[str, list[int]], classes: list[str], cfg: TrainConfig,
              outliers: tuple[np.ndarray, np.ndarray]) -> dict[str, Any]:
    """Temperature, OOD guard and referral threshold, each fitted on training/validation outputs only;
    how they do on test (and the guard on synthetic non-X-rays) is measured and reported, never used
    to choose them. Each split is scored as a prediction is: the guard sees its images and features."""
    temperature = round(evaluation.fit_temperature(logits["val"], labels["val"]), 6)
    guard = ood.OODGuard.fit(features["train"], features["val"])
    covid = covid_index(classes)
    val_probs = evaluation.softmax(logits["val"], temperature)
    threshold = evaluation.referral_threshold(val_probs, labels["val"], covid, cfg.refer_sensitivity)
    referral: dict[str, Any] = {"threshold": round(threshold, 6), "target_covid_sensitivity": cfg.refer_sensitivity}
    ood_rates = {}
    reported = [split for split in logits if split != "train"]
    for split in reported:
        probs = evaluation.softmax(logits[split], temperature)
        flagged = guard.flags(guard.score(features[split], images[split]))
        ood_rates[split] = round(float(flagged.mean()), 4) if len(flagged) else None
        referral[split] = evaluation.referral_summary(
            probs, labels[split], evaluation.refer(probs, flagged, threshold), covid)
    return {
        "temperature": temperature,
        "guard": guard,
        "metrics": {
            "calibration": evaluation.calibration_summary({s: logits[s] for s in reported}, labels, temperature),
            "ood": {**guard.config(), "flagged_rate": ood_rates,
                    "synthetic_outliers_flagged": round(float(guard.flags(guard.score(outliers[1], outliers[0])).mean()), 4)},
            "referral": referral,
        },
        "config": {
            "calibration": {"temperature": temperature, "fitted_on": "val"},
            "ood": guard.config(),
            "referral": {"threshold": round(threshold, 6), "target_covid_sensitivity": cfg.refer_sensitivity,
                         "rule": "refer when out of distribution or calibrated confidence < threshold"},
        },
    }


# --- several data sources ---------------------------------------------------------------------------


def _sources_line(dataset: data_mod.Dataset) -> str:
    if len(dataset.sources) == 1:
        return ""
    held = f"; held out for testing: {dataset.holdout}" if dataset.holdout else ""
    return f"; sources {', '.join(s.name for s in dataset.sources)}{held}"


def _reported_splits(decoded: dict[str, data_mod.Decoded], holdout: str | None) -> dict[str, data_mod.Decoded]:
    """The splits metrics are reported on. With a held-out source, "test" is that source alone (none of
    it was seen in training or model selection) and "test_in_sources" the test split of the sources
    trained on: the gap between the two is what a new hospital should expect to lose."""
    if not holdout:
        return {"val": decoded["val"], "test": decoded["test"]}
    test = decoded["test"].samples
    held = [i for i, s in enumerate(test) if s.source == holdout]
    rest = [i for i, s in enumerate(test) if s.source != holdout]
    return {"val": decoded["val"], "test": decoded["test"].subset(held), "test_in_sources": decoded["test"].subset(rest)}


def _per_source_metrics(
    reported: dict[str, data_mod.Decoded], probs: dict[str, np.ndarray], classes: list[str], cfg: TrainConfig
) -> dict[str, Any]:
    """Metrics on each source's test images (a held-out source's: all its images)."""
    splits = [s for s in ("test", "test_in_sources") if s in reported]
    samples = [x for split in splits for x in reported[split].samples]
    return evaluation.per_source_metrics(
        [x.label for x in samples], np.concatenate([probs[split] for split in splits]), [x.source for x in samples],
        classes, n_boot=cfg.bootstrap, seed=cfg.seed,
    )


def _source_info(dataset: data_mod.Dataset, decoded: dict[str, data_mod.Decoded]) -> dict[str, Any]:
    """Per source: layout, splits carved, images used per split (what `bundle_dataset` checks against)."""
    return {
        s.name: {
            "layout": s.layout, "carved_splits": list(s.carved),
            "counts": {split: sum(x.source == s.name for x in decoded[split].samples) for split in data_mod.SPLITS},
        }
        for s in dataset.sources
    }


def _source_lines(d: dict[str, Any]) -> list[str]:
    if len(d["sources"]) == 1:
        return []
    return ["- sources (each split on its own, then joined):"] + [
        f"  - `{name}`: {s['layout']} layout, carved {', '.join(s['carved_splits']) or 'nothing'}; "
        + ", ".join(f"{split} {n}" for split, n in s["counts"].items())
        + (" — **held out**: never trained on, all its images are the test split" if name == d["holdout_source"] else "")
        for name, s in d["sources"].items()
    ]


def _sources_section(config: dict[str, Any], metrics: dict[str, Any]) -> list[str]:
    """The held-out source against the training sources' own test split, and every source's results."""
    if "per_source" not in metrics:
        return []
    holdout = config["data"]["holdout_source"]
    lines = []
    if holdout:
        lines += [
            "## Test results on the training sources' own test split (in-distribution)",
            "",
            f"The test results above are on `{holdout}`, a source the model never saw. These are on the test split of "
            "the sources it was trained on; the gap between the two is what a new hospital should expect to lose.",
            "",
            evaluation.metrics_table(metrics["test_in_sources"]),
            "",
        ]
    return lines + [
        "## Per-source results",
        "",
        "Each source's test images" + (f" (all images of the held-out `{holdout}`)" if holdout else "")
        + "; with few images per source the confidence intervals are wide. A source far below the others is one "
        "this model does not carry over to.",
        "",
        evaluation.per_source_table(metrics["per_source"], holdout),
        "",
    ]


def write_report(
    run_dir: Path, config: dict[str, Any], metrics: dict[str, Any], fit_result: dict[str, Any], plots: list[str],
    audit_report: audit.AuditReport,
) -> Path:
    classes = config["classes"]
    d = config["data"]
    hp = config["hyperparameters"]
    lines = [
        "# covid-xray training report",
        "",
        "A triage aid to read while RT-PCR results are pending — not a diagnosis.",
        "",
        "## Data",
        f"- layout: {d['layout']}; images used: " + ", ".join(f"{s} {n}" for s, n in d["counts"].items()),
        *_source_lines(d),
        f"- splits carved by covid-xray (stratified, split seed {hp['split_seed']}): {', '.join(d['carved_splits']) or 'none'}; "
        "the exact split of every file is in `splits.csv`",
        "- the **test split was used for nothing but this evaluation**: early stopping and model selection used validation only",
        f"- unreadable images skipped: {len(d['skipped_images'])}" + "".join(f"\n  - {r}" for r in d["skipped_images"]),
        f"- data fingerprint: `{d['fingerprint'][:16]}…`",
        "",
        "## Test results" + (f": held-out source `{d['holdout_source']}`, all its images" if d["holdout_source"] else ""),
        evaluation.metrics_table(metrics["test"]),
        "",
        evaluation.confusion_table(metrics["test"], classes),
        "",
        "![confusion](confusion_test.png) ![roc](roc_test.png)",
        "",
        *_sources_section(config, metrics),
        *_dedup_section(metrics, classes),
        model_card.trust_section(metrics, "##"),
        "",
        "![reliability](reliability_test.png)",
        "",
        f"The bundle carries a model card, `model/{model_card.FILE}`.",
        "",
        "## Shortcut probe: masked lung field",
        "",
        audit.masked_explanation(metrics["test_masked"]),
        "",
        audit_report.to_markdown(heading="##"),
        "",
        "## Validation results (used for model selection, so optimistic)",
        evaluation.metrics_table(metrics["val"]),
        "",
        "## Training",
        f"- backbone `{config['backbone']}`, weights `{hp['weights']}`, input {config['input_size']}×{config['input_size']} grayscale",
        f"- head warm-up on frozen features, then fine-tuning{_frozen_note(config['training']['frozen_parameters'], hp)}: AdamW (lr {hp['lr']}, backbone ×{hp['backbone_lr_scale']}), "
        f"warm-up + cosine, label smoothing {hp['label_smoothing']}, class-weighted loss, seed {hp['seed']}",
        f"- selected epoch {fit_result['best_epoch']} of {len(fit_result['history'])} (lowest validation loss); "
        f"{config['training']['seconds']} s in total",
        "",
        "![learning curves](learning_curves.png)",
        "",
    ]
    path = run_dir / "report.md"
    path.write_text("\n".join(lines))
    return path


def _dedup_section(metrics: dict[str, Any], classes: list[str]) -> list[str]:
    dedup = metrics.get("test_dedup")
    if dedup is None:
        return ["## Test results without leaked images", "", "Every test image is a copy of a training image: "
                "there is no honest test set.", ""]
    if not dedup["excluded"]:
        return ["No test image is a copy of a training or validation image (see the dataset audit below).", ""]
    return [
        "## Test results without leaked images",
        "",
        f"{len(dedup['excluded'])} test images are exact or near copies of training/validation images; a model can "
        "recognise those instead of classifying them. Without them:",
        "",
        evaluation.metrics_table(dedup),
        "",
        evaluation.confusion_table(dedup, classes),
        "",
        "Left out: " + ", ".join(f"`{p}`" for p in dedup["excluded"]),
        "",
    ]
