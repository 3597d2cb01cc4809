"""`covid-xray` commands: parse arguments, call one stage, print. Heavy imports stay inside commands
so that `covid-xray predict` starts fast."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from .errors import CovidXrayError

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".dcm", ".dicom"}


def _launch_torchrun(nproc: int, argv: list[str]) -> int:
    """`train --nproc N`: rerun this same command under torchrun with N local processes."""
    import os
    import subprocess

    rest, skip = [], False
    for arg in argv:
        if skip or arg.startswith("--nproc="):
            skip = False
            continue
        skip = arg == "--nproc"
        if not skip:
            rest.append(arg)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", "-m", "covid_xray.cli", *rest]
    # One thread per process unless told otherwise: N processes already use N cores.
    env = {"OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // nproc)), **os.environ}
    return subprocess.call(cmd, env=env)


def _train(args: argparse.Namespace) -> int:
    import os

    if args.nproc > 1 and "WORLD_SIZE" not in os.environ:
        return _launch_torchrun(args.nproc, args.argv)
    from .data import resolve_data_dir
    from .training import TrainConfig, train_run

    cfg = TrainConfig(
        backbone=args.backbone, weights=args.weights, epochs=args.epochs, seed=args.seed, split_seed=args.split_seed,
        batch_size=args.batch_size, lr=args.lr, patience=args.patience, image_size=args.image_size,
        skip_bad_images=args.skip_bad_images, amp=not args.no_amp,
    )
    out = Path(args.out or f"runs/{time.strftime('%Y%m%d-%H%M%S')}")
    result = train_run(cfg, resolve_data_dir(args.data), out, resume=args.resume, log=lambda m: print(m, flush=True))
    if result:  # empty on the ranks of a distributed run that do not write
        print(f"bundle: {out / 'model'}")
        print(f"report: {result['report']}")
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    from .audit import audit_dataset, metrics_without_leaks
    from .bundle import load_bundle
    from .data import decode_samples, discover, resolve_data_dir
    from .evaluation import compute_metrics, confusion_table, metrics_table
    from .models import predict_probs

    model, config = load_bundle(args.bundle)
    hp = config.get("hyperparameters", {})
    dataset = discover(
        resolve_data_dir(args.data), val_fraction=hp.get("val_fraction", 0.15),
        test_fraction=hp.get("test_fraction", 0.2), split_seed=hp.get("split_seed", 0),
    )
    if dataset.classes != config["classes"]:
        raise CovidXrayError(f"the data's classes {dataset.classes} differ from the bundle's {config['classes']}")
    decoded = decode_samples(dataset[args.split], config["input_size"], skip_bad=args.skip_bad_images)
    y = [s.label for s in decoded.samples]
    probs = predict_probs(model, decoded.images)
    metrics = compute_metrics(y, probs, dataset.classes, n_boot=args.bootstrap)
    metrics["skipped_images"] = decoded.bad
    if args.split == "test":  # copies of training images in test inflate every metric: report both
        report = audit_dataset(dataset, probe=False)
        metrics["dedup"] = metrics_without_leaks(decoded.samples, probs, report, n_boot=args.bootstrap)
    if args.json:
        print(json.dumps(metrics, indent=2))
        return 0
    print(f"{args.split} split of {args.data or 'the dataset'}\n\n{metrics_table(metrics)}\n\n{confusion_table(metrics, dataset.classes)}")
    dedup = metrics.get("dedup")
    if dedup and dedup["excluded"]:
        print(f"\nwithout the {len(dedup['excluded'])} test images that are copies of training/validation images "
              f"(covid-xray audit lists them)\n\n{metrics_table(dedup)}\n\n{confusion_table(dedup, dataset.classes)}")
    return 0


def _expand(paths: list[str]) -> list[Path]:
    files: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            files += sorted(f for f in p.rglob("*") if f.suffix.lower() in IMAGE_SUFFIXES and f.is_file())
        else:
            files.append(p)
    if not files:
        raise CovidXrayError(f"no images found in {' '.join(paths)}")
    return files


def _predict(args: argparse.Namespace) -> int:
    from .inference import Predictor

    predictor = Predictor.from_bundle(args.bundle)
    rows = predictor.predict_paths(_expand(args.paths))
    if args.out:
        import csv

        with open(args.out, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["path", "label", *predictor.classes, "error"])
            for r in rows:
                probs = r.get("probabilities", {})
                writer.writerow([r["path"], r.get("label", ""), *(probs.get(c, "") for c in predictor.classes), r.get("error", "")])
    if args.json:
        print(json.dumps(rows, indent=2))
    elif not args.out:
        width = max(len(r["path"]) for r in rows)
        print(f"{'image':<{width}}  {'label':<16}  " + "  ".join(f"{c:>16}" for c in predictor.classes))
        for r in rows:
            if "error" in r:
                print(f"{r['path']:<{width}}  error: {r['error']}")
            else:
                print(f"{r['path']:<{width}}  {r['label']:<16}  " + "  ".join(f"{r['probabilities'][c]:>16.4f}" for c in predictor.classes))
    return 1 if any("error" in r for r in rows) else 0


def _audit(args: argparse.Namespace) -> int:
    from .audit import NEAR_THRESHOLD, audit_dataset
    from .data import discover, resolve_data_dir

    threshold = NEAR_THRESHOLD if args.near_threshold is None else args.near_threshold
    report = audit_dataset(discover(resolve_data_dir(args.data or args.data_option)), near_threshold=threshold)
    print(json.dumps(report.to_dict(), indent=2) if args.json else report.to_markdown(heading="#"))
    return 0


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(prog="covid-xray", description="Chest X-ray triage: train, evaluate, predict.")
    parser.add_argument("--version", action="version", version=f"covid-xray {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="fine-tune a pretrained CNN and evaluate it on the test split")
    p.add_argument("--data", help="dataset folder or CSV manifest (default: $COVID_XRAY_DATA, then ./data/Covid19-dataset)")
    p.add_argument("--out", help="run folder (default: runs/<timestamp>)")
    p.add_argument("--backbone", default="tf_efficientnet_lite0", help="any timm model name")
    p.add_argument("--weights", default="imagenet", help="imagenet | none | path to a state dict")
    p.add_argument("--epochs", type=int, default=12)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-3, help="head learning rate (backbone gets 0.3×)")
    p.add_argument("--patience", type=int, default=6, help="early-stopping patience in epochs")
    p.add_argument("--image-size", type=int, help="input size (default: the backbone's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--split-seed", type=int, default=0, help="seed for carving validation/test splits")
    p.add_argument("--skip-bad-images", action="store_true", help="skip unreadable files (counted in the report)")
    p.add_argument("--resume", action="store_true", help="continue from RUN/checkpoint.pt")
    p.add_argument("--no-amp", action="store_true", help="train in float32 even where bfloat16 is fast")
    p.add_argument("--nproc", type=int, default=1, help="train with N processes via torchrun (DDP; gloo on CPU)")
    p.set_defaults(func=_train)

    p = sub.add_parser("evaluate", help="re-evaluate a bundle on a dataset split")
    p.add_argument("bundle")
    p.add_argument("--data")
    p.add_argument("--split", default="test", choices=["train", "val", "test"])
    p.add_argument("--json", action="store_true", help="print metrics as JSON")
    p.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples for the confidence intervals")
    p.add_argument("--skip-bad-images", action="store_true")
    p.set_defaults(func=_evaluate)

    p = sub.add_parser("predict", help="predict X-ray images or folders of them")
    p.add_argument("bundle")
    p.add_argument("paths", nargs="+", metavar="PATH")
    p.add_argument("--json", action="store_true", help="print one JSON array, an object per image")
    p.add_argument("--out", help="write predictions to this CSV file")
    p.set_defaults(func=_predict)

    p = sub.add_parser("audit", help="check a dataset: duplicates, leakage between splits, unreadable files, shortcuts")
    p.add_argument("data", nargs="?", help="dataset folder or CSV manifest (default: $COVID_XRAY_DATA, then ./data/Covid19-dataset)")
    # --data too, as in train and evaluate (and as the dataset-not-found message suggests).
    p.add_argument("--data", dest="data_option", help=argparse.SUPPRESS)
    p.add_argument("--json", action="store_true", help="print the audit as JSON")
    # The default lives in audit.NEAR_THRESHOLD; importing it here would slow every command's start.
    p.add_argument("--near-threshold", type=int, metavar="BITS",
                   help="near duplicates: perceptual hashes at most this many of 256 bits apart (default 32)")
    p.set_defaults(func=_audit)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    args.argv = argv
    try:
        return args.func(args)
    except CovidXrayError as e:
        print(f"covid-xray: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("covid-xray: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
