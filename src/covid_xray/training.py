"""Fine-tuning: head warm-up on cached features, then fine-tuning with early stopping.

`train_run` is the `covid-xray train` job (and the SageMaker entry point's): data → audit → model → fit →
trust fitting → evaluation on the untouched test split → bundle, metrics.json, report.md and plots in the
run folder. Where the job runs (devices, torchrun, mixed precision) is `runtime`'s business.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import time
from collections.abc import Callable, Sequence
from functools import partial
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from . import audit, model_card, ood, plots
from . import data as data_mod
from .bundle import ONNX, BundleConfig, add_files, save_bundle
from .calibration import softmax
from .config import MIN_IMAGE_SIZE, TrainConfig
from .duplicates import leaked_test_paths
from .errors import CovidXrayError
from .evaluation import evaluate_outputs, external_samples, masked_probe, size_swap_probe, split_test
from .images import Decoded, decode_samples
from .metrics import summary_lines
from .inference import OnnxModel
from .models import XrayNet, create_model, input_size, predict_outputs
from .report import write_report
from .runtime import Distributed, autocast, pick_device, seed_everything, slow_bf16_convs_in_fp32
from .confounds import source_mix_explanation
from .trust import SplitOutputs, Trust, fit_trust
from .util import atomic_path, atomic_write, onnx_available, relative_path

CHECKPOINT = "checkpoint.pt"


def image_size(cfg: TrainConfig) -> int:
    """The input size: the configured one, else the backbone's pretraining size, at least MIN_IMAGE_SIZE."""
    return cfg.image_size or max(MIN_IMAGE_SIZE, input_size(cfg.backbone))


@dataclass
class FitResult:
    history: list[dict[str, float]]  # per epoch: train_loss, val_loss, val_accuracy
    best_epoch: int
    best_val_loss: float
    frozen_parameters: int


@dataclass
class TrainResult:
    run_dir: Path
    report: Path
    metrics: dict[str, Any]  # what metrics.json holds
    config: BundleConfig


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
    train: Decoded,
    val: Decoded,
    cfg: TrainConfig,
    run_dir: Path,
    *,
    resume: bool = False,
    dist: Distributed = Distributed(),
    log=print,
) -> FitResult:
    """Train with AdamW, warm-up + cosine, label smoothing and class weights; keep the epoch with
    the lowest validation loss from `min_epochs` on; checkpoint every epoch.

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
    dataset = data_mod.ImageTensors(train.images, train_labels, data_mod.augmentation(image_size(cfg), cfg.texture_jitter))
    sampler = torch.utils.data.DistributedSampler(dataset, dist.world, dist.rank, shuffle=True, seed=cfg.seed)

    state: dict[str, Any] = {"epoch": 0, "history": [], "best_epoch": 0, "best_val_loss": float("inf"), "best_state": None}
    checkpoint = run_dir / CHECKPOINT
    if resume and checkpoint.is_file():
        saved = torch.load(checkpoint, map_location=device, weights_only=True)
        if saved["config"] != cfg.resume_key():
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
            with atomic_path(checkpoint) as tmp:
                torch.save({"config": cfg.resume_key(), "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                            "scheduler": scheduler.state_dict(), "state": state}, tmp)
    bar.close()
    if state["best_state"] is not None:
        model.load_state_dict(state["best_state"])
    return FitResult(state["history"], state["best_epoch"], state["best_val_loss"], frozen)


def train_run(
    cfg: TrainConfig, data: str | os.PathLike | Sequence[data_mod.Source], out_dir: str | os.PathLike, *,
    resume: bool = False, log=print,
) -> TrainResult | None:
    """The whole training job. Writes RUN/model (the bundle), metrics.json, report.md, plots, splits.csv.

    Under torchrun, all ranks train; rank 0 alone audits, evaluates and writes. Other ranks return None."""
    started = time.time()
    dist = Distributed.from_env()
    if not dist.main:
        log = lambda message: None
    run_dir = Path(out_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    seed_everything(cfg.seed)
    size = image_size(cfg)

    dataset = _discover(cfg, data, log)
    # Another site's films are listed (and a class the data lacks refused) before minutes of training, not after.
    external = external_samples(dataset.classes, cfg.external) if cfg.external else None
    audit_report = _audit(dataset, run_dir, cfg.seed, log) if dist.main else None
    decoded = {s: decode_samples(dataset[s], size, skip_bad=cfg.skip_bad_images) for s in data_mod.SPLITS}
    for reason in _skipped(decoded):
        log(f"skipped unreadable image: {reason}")
    model = create_model(cfg.backbone, len(dataset.classes), cfg.weights)
    fit_started = time.time()
    fitted = fit(model, decoded["train"], decoded["val"], cfg, run_dir, resume=resume, dist=dist, log=log)
    dist.close()
    if not dist.main:
        return None
    model.cpu()
    fit_ended = time.time()

    with tempfile.TemporaryDirectory(dir=run_dir, prefix=".export-") as tmp:
        graph = _export(model, size, cfg, Path(tmp) / ONNX, log)
        # Every pass after the fit runs on the exported graph when there is one: 3-4× faster than eager
        # PyTorch on a CPU, and within ~1e-6 of it (checked by the export).
        forward = OnnxModel(graph) if graph else partial(predict_outputs, model)
        reported = {"val": decoded["val"], **split_test(decoded["test"], dataset.holdout)}
        if external:  # another site's labelled films: every figure of the test split, next to it
            reported["external"] = decode_samples(external, size, skip_bad=cfg.skip_bad_images)
        outputs = _outputs(forward, {"train": decoded["train"], **reported})
        trust = fit_trust(outputs, dataset.classes, cfg.refer_sensitivity, _outlier_outputs(forward, size))
        metrics, figures = _evaluate(forward, reported, outputs, trust, dataset, audit_report, cfg, run_dir)
        plots.plot_learning_curves(fitted.history, fitted.best_epoch, run_dir / "learning_curves.png")
        figures.append("learning_curves.png")
        config = _bundle_config(model, cfg, size, dataset, decoded, audit_report, fitted, metrics, trust,
                                seconds=time.time() - started, processes=dist.world)
        _write_bundle(run_dir / "model", model, config, trust, metrics, audit_report, graph)
    metrics["timing"] = {"setup_seconds": round(fit_started - started, 1),
                         "fit_seconds": round(fit_ended - fit_started, 1),
                         "post_fit_seconds": round(time.time() - fit_ended, 1),
                         "post_fit_backend": "onnx" if graph else "torch"}
    atomic_write(run_dir / "metrics.json", json.dumps(metrics, indent=2))
    report = write_report(run_dir, config, metrics, fitted, figures, audit_report)
    (run_dir / CHECKPOINT).unlink(missing_ok=True)  # the run is complete; the bundle holds the result
    _log_summary(metrics, time.time() - started, log)
    return TrainResult(run_dir, report, metrics, config)


def _discover(cfg: TrainConfig, data, log) -> data_mod.Dataset:
    dataset = data_mod.discover(data, val_fraction=cfg.val_fraction, test_fraction=cfg.test_fraction,
                                split_seed=cfg.split_seed, holdout=cfg.holdout_source,
                                drop_mislabelled=cfg.drop_mislabelled)
    if dataset.dropped:
        log(f"left out {len(dataset.dropped)} files known to be mislabelled (--no-drop-mislabelled keeps them)")
    log(f"data: {dataset.layout} layout, classes {dataset.classes}, "
        + ", ".join(f"{s} {len(dataset[s])}" for s in data_mod.SPLITS) + _sources_line(dataset))
    return dataset


def _audit(dataset: data_mod.Dataset, run_dir: Path, seed: int, log) -> audit.AuditReport:
    """The dataset audit (rank 0 only), written to audit.json and splits.csv, with its warnings logged."""
    dataset.write_splits_csv(run_dir / "splits.csv")
    report = audit.audit_dataset(dataset, seed=seed)
    atomic_write(run_dir / "audit.json", json.dumps(report.to_dict(), indent=2))
    leaked = len(leaked_test_paths(report))
    if leaked:
        log(f"warning: {leaked} test images are exact or near copies of training/validation images; "
            "test metrics are reported with and without them (audit.json lists them)")
    if report.source_mix and report.source_mix.verdict != "none":
        log(f"warning: {source_mix_explanation(report.source_mix)}")
    for confound in report.size_confounds:
        log(f"warning: {confound.explanation()}")
    if report.known_mislabelled:
        log(f"warning: {len(report.known_mislabelled)} files are known to be mislabelled (audit.json → "
            "known_mislabelled); benchmarks/without_sars.py writes a manifest without them")
    return report


def _skipped(decoded: dict[str, Decoded]) -> list[str]:
    return [reason for d in decoded.values() for reason in d.bad]


# uint8 images N×S×S → logits N×C and penultimate features N×D: the exported graph or eager PyTorch.
Forward = Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]


def _export(model: XrayNet, size: int, cfg: TrainConfig, out: Path, log) -> Path | None:
    """model.onnx for the bundle, checked against PyTorch, unless --no-onnx or the onnx extra is missing."""
    if not (cfg.onnx and onnx_available()):
        return None
    from .export import export_checked

    export_checked(model, size, out, log)
    return out


def _outputs(forward: Forward, splits: dict[str, Decoded]) -> dict[str, SplitOutputs]:
    """Each split forwarded once: logits and features for the trust fitting and every metric."""
    outputs = {}
    for name, d in splits.items():
        logits, features = forward(d.images)
        outputs[name] = SplitOutputs(d.images, logits, features, [s.label for s in d.samples])
    return outputs


def _outlier_outputs(forward: Forward, size: int) -> tuple[np.ndarray, np.ndarray]:
    outliers = np.concatenate(list(ood.synthetic_outliers(size).values()))
    return outliers, forward(outliers)[1]


def _evaluate(forward: Forward, reported: dict[str, Decoded], outputs: dict[str, SplitOutputs], trust: Trust,
              dataset: data_mod.Dataset, audit_report: audit.AuditReport, cfg: TrainConfig,
              run_dir: Path) -> tuple[dict[str, Any], list[str]]:
    """metrics.json's figures on the reported splits (calibrated probabilities), the masked-lung shortcut
    probe and the plots; returns the metrics and the plot files written."""
    probs = {split: softmax(outputs[split].logits, trust.temperature) for split in reported}
    metrics = evaluate_outputs({s: d.samples for s, d in reported.items()}, probs, dataset.classes,
                               audit_report=audit_report, multi_source=len(dataset.sources) > 1,
                               n_boot=cfg.bootstrap, seed=cfg.seed)
    metrics.update(trust.metrics)
    if "external" in reported:
        metrics["external"]["source"] = reported["external"].samples[0].source
    test = outputs["test"]
    probabilities = lambda images: softmax(forward(images)[0])  # uncalibrated, as the probes always were
    metrics["test_masked"] = masked_probe(probabilities, test.images[:], test.labels, full=softmax(test.logits))
    tested = [s for split in ("test", "test_in_sources") if split in reported for s in reported[split].samples]
    swaps = [size_swap_probe(probabilities, tested, dataset.classes, confound, image_size(cfg))
             for confound in audit_report.size_confounds]
    if any(swaps):
        metrics["size_swap"] = [swap for swap in swaps if swap]
    figures = [f for split in reported
               for f in plots.write_plots(run_dir, split, outputs[split].labels, probs[split], dataset.classes,
                                          metrics[split])]
    plots.plot_reliability(test.logits, test.labels, trust.temperature, run_dir / "reliability_test.png",
                           "Reliability (test)")
    figures.append("reliability_test.png")
    return metrics, figures


def _bundle_config(model: XrayNet, cfg: TrainConfig, size: int, dataset: data_mod.Dataset, decoded: dict[str, Decoded],
                   audit_report: audit.AuditReport, fitted: FitResult, metrics: dict[str, Any], trust: Trust, *,
                   seconds: float, processes: int) -> BundleConfig:
    data_info = {
        "layout": dataset.layout,
        "carved_splits": dataset.carved,
        "counts": {s: len(decoded[s].samples) for s in data_mod.SPLITS},
        "skipped_images": _skipped(decoded),
        "dropped_mislabelled": [relative_path(p, dataset.root) for p in dataset.dropped],
        "audit": {
            "exact_duplicate_groups": len(audit_report.exact_groups),
            "near_duplicate_pairs": len(audit_report.near_pairs),
            "leaked_test_images": len(leaked_test_paths(audit_report)),
            "metadata_probe": audit_report.probe.to_dict() if audit_report.probe else None,
            "class_by_source": audit_report.source_mix.to_dict() if audit_report.source_mix else None,
            "size_confounds": [c.to_dict() for c in audit_report.size_confounds],
            "known_mislabelled": {f.label: sum(g.label == f.label for g, _ in audit_report.known_mislabelled)
                                  for f, _ in audit_report.known_mislabelled},
        },
        "sources": _source_info(dataset, decoded),
        "holdout_source": dataset.holdout,
        "fingerprint": data_mod.fingerprint(
            {s: decoded[s].digests for s in data_mod.SPLITS}, dataset.classes, {s: decoded[s].samples for s in data_mod.SPLITS}
        ),
    }
    return BundleConfig(
        backbone=cfg.backbone,
        classes=dataset.classes,
        input_size=size,
        normalization=model.normalization(),
        hyperparameters=cfg,
        training={"best_epoch": fitted.best_epoch, "epochs_run": len(fitted.history),
                  "frozen_parameters": fitted.frozen_parameters, "seconds": round(seconds, 1), "processes": processes},
        data=data_info,
        metrics={split: {"accuracy": metrics[split]["accuracy"], "macro_auc": metrics[split]["macro_auc"],
                         "n": metrics[split]["n"]}
                 for split in ("val", "test", "test_in_sources", "test_dedup", "external") if split in metrics},
        **trust.bundle_entries(),
    )


def _write_bundle(path: Path, model: XrayNet, config: BundleConfig, trust: Trust, metrics: dict[str, Any],
                  audit_report: audit.AuditReport, graph: Path | None) -> None:
    card = model_card.render(config, metrics, audit_report)
    save_bundle(path, model, config, files={ood.FILE: trust.guard.to_bytes(), model_card.FILE: card})
    if graph:
        from .export import graph_record

        add_files(path, {ONNX: graph}, graph_record(config.input_size))


def _log_summary(metrics: dict[str, Any], seconds: float, log) -> None:
    """The `name=value` lines SageMaker's metric definitions scrape."""
    lines = [line for split in ("test", "test_in_sources", "test_dedup", "external") if split in metrics
             for line in summary_lines(metrics[split], split)]
    for line in lines + [f"train_seconds={seconds:.1f}"]:
        log(line)


def _sources_line(dataset: data_mod.Dataset) -> str:
    if len(dataset.sources) == 1:
        return ""
    held = f"; held out for testing: {dataset.holdout}" if dataset.holdout else ""
    return f"; sources {', '.join(s.name for s in dataset.sources)}{held}"


def _source_info(dataset: data_mod.Dataset, decoded: dict[str, Decoded]) -> dict[str, Any]:
    """Per source: layout, splits carved, images used per split (what re-evaluation checks against)."""
    return {
        s.name: {
            "layout": s.layout, "carved_splits": list(s.carved),
            "counts": {split: sum(x.source == s.name for x in decoded[split].samples) for split in data_mod.SPLITS},
        }
        for s in dataset.sources
    }
