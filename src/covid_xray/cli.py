"""`covid-xray` commands: parse arguments, call one stage, print. Heavy imports stay inside commands
so that `covid-xray predict` starts fast."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from .errors import CovidXrayError

BACKEND_HELP = ("auto (ONNX Runtime when the bundle has model.onnx, else PyTorch) | torch | onnx | onnx-int8; "
                "default: $COVID_XRAY_BACKEND, else auto")
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".dcm", ".dicom"}


def _train(args: argparse.Namespace) -> int:
    from .data import resolve_data_dir
    from .training import TrainConfig, train_run

    cfg = TrainConfig(
        backbone=args.backbone, weights=args.weights, epochs=args.epochs, seed=args.seed, split_seed=args.split_seed,
        batch_size=args.batch_size, lr=args.lr, patience=args.patience, image_size=args.image_size,
        skip_bad_images=args.skip_bad_images, amp=not args.no_amp,
    )
    out = Path(args.out or f"runs/{time.strftime('%Y%m%d-%H%M%S')}")
    result = train_run(cfg, resolve_data_dir(args.data), out, resume=args.resume, log=lambda m: print(m, flush=True))
    print(f"bundle: {out / 'model'}")
    print(f"report: {result['report']}")
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    from .data import decode_samples, discover, resolve_data_dir
    from .evaluation import compute_metrics, confusion_table, metrics_table
    from .inference import Predictor

    predictor = Predictor.from_bundle(args.bundle, backend=args.backend)
    config = predictor.config
    hp = config.get("hyperparameters", {})
    dataset = discover(
        resolve_data_dir(args.data), val_fraction=hp.get("val_fraction", 0.15),
        test_fraction=hp.get("test_fraction", 0.2), split_seed=hp.get("split_seed", 0),
    )
    if dataset.classes != config["classes"]:
        raise CovidXrayError(f"the data's classes {dataset.classes} differ from the bundle's {config['classes']}")
    decoded = decode_samples(dataset[args.split], config["input_size"], skip_bad=args.skip_bad_images)
    y = [s.label for s in decoded.samples]
    metrics = compute_metrics(y, predictor.probabilities(decoded.images), dataset.classes, n_boot=args.bootstrap)
    metrics["skipped_images"] = decoded.bad
    if args.json:
        print(json.dumps(metrics, indent=2))
    else:
        print(f"{args.split} split of {args.data or 'the dataset'}\n\n{metrics_table(metrics)}\n\n{confusion_table(metrics, dataset.classes)}")
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

    predictor = Predictor.from_bundle(args.bundle, backend=args.backend)
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


def _export(args: argparse.Namespace) -> int:
    from .export import export_bundle

    if not args.onnx:
        raise CovidXrayError("nothing to export: pass --onnx (and --int8 for the quantised variant too)")
    config = export_bundle(args.bundle, int8=args.int8, data=args.data, calibration_images=args.calibration_images)
    print("bundle files: " + ", ".join(sorted(config["files"])))
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
    p.add_argument("--patience", type=int, default=4, help="early-stopping patience in epochs")
    p.add_argument("--image-size", type=int, help="input size (default: the backbone's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--split-seed", type=int, default=0, help="seed for carving validation/test splits")
    p.add_argument("--skip-bad-images", action="store_true", help="skip unreadable files (counted in the report)")
    p.add_argument("--resume", action="store_true", help="continue from RUN/checkpoint.pt")
    p.add_argument("--no-amp", action="store_true", help="train in float32 even where bfloat16 is fast")
    p.set_defaults(func=_train)

    p = sub.add_parser("evaluate", help="re-evaluate a bundle on a dataset split")
    p.add_argument("bundle")
    p.add_argument("--data")
    p.add_argument("--split", default="test", choices=["train", "val", "test"])
    p.add_argument("--json", action="store_true", help="print metrics as JSON")
    p.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples for the confidence intervals")
    p.add_argument("--skip-bad-images", action="store_true")
    p.add_argument("--backend", help=BACKEND_HELP)
    p.set_defaults(func=_evaluate)

    p = sub.add_parser("predict", help="predict X-ray images or folders of them")
    p.add_argument("bundle")
    p.add_argument("paths", nargs="+", metavar="PATH")
    p.add_argument("--json", action="store_true", help="print one JSON array, an object per image")
    p.add_argument("--out", help="write predictions to this CSV file")
    p.add_argument("--backend", help=BACKEND_HELP)
    p.set_defaults(func=_predict)

    p = sub.add_parser("export", help="add ONNX graphs (fp32, optionally int8) to a bundle for fast CPU inference")
    p.add_argument("bundle")
    p.add_argument("--onnx", action="store_true", help="write model.onnx (uint8 image in, logits out, dynamic batch)")
    p.add_argument("--int8", action="store_true", help="also write model.int8.onnx, calibrated on training images")
    p.add_argument("--data", help="the training data, for int8 calibration (default: $COVID_XRAY_DATA)")
    p.add_argument("--calibration-images", type=int, default=128, help="training images used to calibrate int8")
    p.set_defaults(func=_export)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
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
