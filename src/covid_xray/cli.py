"""`covid-xray` commands: parse arguments, call one stage, print. Heavy imports stay inside commands
so that `covid-xray predict` starts fast."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from .errors import CovidXrayError

BACKEND_HELP = ("auto (ONNX Runtime when the bundle has model.onnx, else PyTorch) | torch | onnx | onnx-int8; "
                "default: $COVID_XRAY_BACKEND, else auto")

DATA_HELP = ("dataset folder or CSV manifest; repeat for several sources, each NAME=PATH or PATH (named after "
             "its folder) (default: $COVID_XRAY_DATA, then ./data/Covid19-dataset)")


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


def train_config(args: argparse.Namespace):
    """The TrainConfig that `covid-xray train` options describe."""
    from .training import TrainConfig

    return TrainConfig(
        backbone=args.backbone, weights=args.weights, epochs=args.epochs, seed=args.seed, split_seed=args.split_seed,
        batch_size=args.batch_size, lr=args.lr, patience=args.patience, min_epochs=args.min_epochs,
        image_size=args.image_size, skip_bad_images=args.skip_bad_images, amp=not args.no_amp, onnx=not args.no_onnx,
        fp32_depthwise=args.fp32_depthwise, holdout_source=args.holdout_source, freeze_stride=args.freeze_stride,
    )


def _train(args: argparse.Namespace) -> int:
    import os

    if args.nproc > 1 and "WORLD_SIZE" not in os.environ:
        return _launch_torchrun(args.nproc, args.argv)
    from .data import parse_sources
    from .training import train_run

    out = Path(args.out or f"runs/{time.strftime('%Y%m%d-%H%M%S')}")
    result = train_run(
        train_config(args), parse_sources(args.data), out, resume=args.resume, log=lambda m: print(m, flush=True)
    )
    if result:  # empty on the ranks of a distributed run that do not write
        print(f"bundle: {out / 'model'}")
        print(f"report: {result['report']}")
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    from .audit import audit_dataset, metrics_without_leaks
    from .bundle import bundle_dataset
    from .data import decode_samples
    from .evaluation import compute_metrics, confusion_table, metrics_table, per_source_metrics, per_source_table
    from .inference import Predictor

    predictor = Predictor.from_bundle(args.bundle, backend=args.backend)
    config = predictor.config
    dataset = bundle_dataset(config, args.data)
    decoded = decode_samples(dataset[args.split], config["input_size"], skip_bad=args.skip_bad_images)
    y = [s.label for s in decoded.samples]
    probs = predictor.probabilities(decoded.images[:])
    metrics = compute_metrics(y, probs, dataset.classes, n_boot=args.bootstrap)
    metrics["skipped_images"] = decoded.bad
    if args.split == "test":  # copies of training images in test inflate every metric: report both
        report = audit_dataset(dataset, probe=False)
        metrics["dedup"] = metrics_without_leaks(decoded.samples, probs, report, n_boot=args.bootstrap)
    if len(dataset.sources) > 1:
        metrics["per_source"] = per_source_metrics(y, probs, [s.source for s in decoded.samples], dataset.classes,
                                                   n_boot=args.bootstrap)
    if args.json:
        print(json.dumps(metrics, indent=2))
        return 0
    where = ", ".join(args.data) if args.data else "the dataset"
    print(f"{args.split} split of {where}\n\n{metrics_table(metrics)}\n\n{confusion_table(metrics, dataset.classes)}")
    dedup = metrics.get("dedup")
    if dedup and dedup["excluded"]:
        print(f"\nwithout the {len(dedup['excluded'])} test images that are copies of training/validation images "
              f"(covid-xray audit lists them)\n\n{metrics_table(dedup)}\n\n{confusion_table(dedup, dataset.classes)}")
    if "per_source" in metrics:
        print(f"\nper source\n\n{per_source_table(metrics['per_source'], dataset.holdout)}")
    return 0


def _quiet_omp() -> None:
    """Make idle OpenMP threads sleep instead of spin (read once, when torch loads). Spinning
    threads starve the decoding threads and the HTTP loop that share these cores with the model,
    and on a busy machine a spinning team turns a 30 ms forward pass into seconds."""
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def _predict(args: argparse.Namespace) -> int:
    _quiet_omp()
    from tqdm import tqdm

    from .batch import PredictionCSV, expand_paths, iter_predictions
    from .inference import Predictor

    if args.resume and not args.out:
        raise CovidXrayError("--resume needs --out: it continues the CSV that --out names")
    files = expand_paths(args.paths)
    predictor = Predictor.from_bundle(args.bundle, backend=args.backend)
    sink = PredictionCSV(args.out, predictor.classes, resume=args.resume) if args.out else None
    todo = [f for f in files if str(f) not in sink.done] if sink else files
    if sink and len(todo) < len(files):
        print(f"resuming: {len(files) - len(todo)} of {len(files)} images already in {args.out}", file=sys.stderr)
    rows, errors = [], 0
    bar = tqdm(total=len(todo), unit="img", file=sys.stderr, disable=args.no_progress or len(todo) < 2)
    try:
        for row in iter_predictions(predictor, todo, batch_size=args.batch_size, workers=args.workers):
            if sink:
                sink.write([row])
            if args.json or not sink:
                rows.append(row)
            errors += "error" in row
            bar.update()
    finally:
        bar.close()
        if sink:
            sink.close()
    if args.json:
        print(json.dumps(rows, indent=2))
    elif not sink:
        _print_table(rows, predictor.classes)
    return 1 if errors else 0


def _print_table(rows: list[dict], classes: list[str]) -> None:
    width = max(len(r["path"]) for r in rows)
    print(f"{'image':<{width}}  {'label':<16}  " + "  ".join(f"{c:>16}" for c in classes) + "  flags")
    for r in rows:
        if "error" in r:
            print(f"{r['path']:<{width}}  error: {r['error']}")
            continue
        flags = ("NOT A CHEST X-RAY? (out of distribution): REFER" if r.get("ood")
                 else "REFER: low confidence" if r.get("refer") else "")
        print(f"{r['path']:<{width}}  {r['label']:<16}  " + "  ".join(f"{r['probabilities'][c]:>16.4f}" for c in classes)
              + "  " + flags)


def _serve(args: argparse.Namespace) -> int:
    _quiet_omp()
    from .bundle import read_config
    from .server import ServerSettings, serve

    config = read_config(args.bundle)  # a wrong path fails here, in one line, not in a worker's log
    if args.backend:  # checked now; passed on through the environment so that every worker uses it
        from .inference import BACKEND_ENV, resolve_backend

        resolve_backend(args.backend, config, Path(args.bundle))
        os.environ[BACKEND_ENV] = args.backend
    try:
        settings = ServerSettings(
            max_batch_size=args.max_batch_size, max_wait_ms=args.max_wait_ms, queue_size=args.queue_size,
            max_body_bytes=int(args.max_body_mb * 1024 * 1024), max_instances=args.max_instances,
        ).for_processes(args.workers, args.inference_threads)
    except ValueError as e:
        raise CovidXrayError(str(e)) from None
    serve(args.bundle, host=args.host, port=args.port, workers=args.workers, settings=settings, log_level=args.log_level)
    return 0


def _audit(args: argparse.Namespace) -> int:
    from .audit import NEAR_THRESHOLD, audit_dataset
    from .data import discover, parse_sources

    threshold = NEAR_THRESHOLD if args.near_threshold is None else args.near_threshold
    report = audit_dataset(discover(parse_sources(args.data + (args.data_option or []))), near_threshold=threshold)
    print(json.dumps(report.to_dict(), indent=2) if args.json else report.to_markdown(heading="#"))
    return 0


def _export(args: argparse.Namespace) -> int:
    from .export import export_bundle

    if not args.onnx:
        raise CovidXrayError("nothing to export: pass --onnx (and --int8 for the quantised variant too)")
    config = export_bundle(args.bundle, int8=args.int8, data=args.data, calibration_images=args.calibration_images)
    print("bundle files: " + ", ".join(sorted(config["files"])))
    return 0


def _explain(args: argparse.Namespace) -> int:
    import numpy as np

    from .explain import gradcam, overlay
    from .inference import Predictor

    # PyTorch for the probabilities too: the printed probability is then the explained model's own.
    predictor = Predictor.from_bundle(args.bundle, backend="torch")
    if args.class_name is not None and args.class_name not in predictor.classes:
        raise CovidXrayError(f"unknown class {args.class_name!r}; this bundle's classes are: {', '.join(predictor.classes)}")
    image = predictor.preprocess(args.image)
    probs = predictor.probabilities(np.stack([image]))[0]
    predicted = int(probs.argmax())
    target = predicted if args.class_name is None else predictor.classes.index(args.class_name)
    picture = overlay(image, gradcam(predictor.model, image, target))
    out = Path(args.out)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")  # never leave a half-written PNG under the real name
    try:
        picture.save(tmp, format="PNG")
        os.replace(tmp, out)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise CovidXrayError(f"cannot write {out}: {e.strerror or e}") from None
    print(f"predicted: {predictor.classes[predicted]} (probability {probs[predicted]:.4f})")
    print(f"heatmap: {out} (class {predictor.classes[target]}, probability {probs[target]:.4f})")
    return 0


def _sagemaker_train(args: argparse.Namespace) -> int:
    from .sagemaker import entry, launcher

    if bool(args.data) == bool(args.train):
        raise CovidXrayError("pass either --data DIR or --train PATH_OR_URI [--test PATH_OR_URI]")
    inputs = launcher.channels(args.data) if args.data else {"train": args.train, **({"test": args.test} if args.test else {})}
    job = launcher.train(
        inputs, instance_type=args.instance_type, instance_count=args.instance_count,
        hyperparameters=entry.parse_hyperparameter_args(args.extra), out=args.job_dir, role=args.role,
        region=args.region, log=lambda line: print(line, flush=True),
    )
    print(f"job: {job.name}\nmodel_data: {job.model_data}")
    if job.output_dir:
        print(f"output: {job.output_dir}")
    print(f"next: covid-xray sagemaker deploy --job-dir {args.job_dir}")
    return 0


def _sagemaker_deploy(args: argparse.Namespace) -> int:
    from .sagemaker import launcher

    job = launcher.TrainingJob(**launcher.load_state(args.job_dir)["job"])
    endpoint = launcher.deploy(job, instance_type=args.instance_type, role=args.role, region=args.region, port=args.port)
    described = endpoint.describe()
    launcher.save_state(args.job_dir, endpoint=described)
    print(f"endpoint: {described.get('url') or described['name']}")
    if described["kind"] in launcher.LOCAL_MODES:  # a local-mode endpoint lives as long as this process
        print("serving until Ctrl-C", flush=True)
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            endpoint.delete_endpoint()
            launcher.save_state(args.job_dir, endpoint=None)
            raise
    print(f"next: covid-xray sagemaker predict --job-dir {args.job_dir} IMAGE...")
    return 0


def _sagemaker_predict(args: argparse.Namespace) -> int:
    from .sagemaker import launcher

    endpoint = launcher.recorded_endpoint(args.job_dir)
    if endpoint is None:
        raise CovidXrayError(f"no endpoint deployed from {args.job_dir}: run 'covid-xray sagemaker deploy --job-dir {args.job_dir}'")
    rows, classes = [], []
    for path in args.images:
        if not Path(path).is_file():
            raise CovidXrayError(f"{path} is not a file")
        response = endpoint.predict(Path(path).read_bytes())  # one request per image, as a client would
        rows.append({"path": path, **response["predictions"][0]})
        classes = response["model"]["classes"]
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        _print_table(rows, classes)
    return 0


def _sagemaker_cleanup(args: argparse.Namespace) -> int:
    from .sagemaker import launcher

    endpoint = launcher.recorded_endpoint(args.job_dir)
    if endpoint is None:
        print("no endpoint to delete")
        return 0
    endpoint.delete_endpoint()
    launcher.save_state(args.job_dir, endpoint=None)
    print("endpoint deleted")
    return 0


def _add_sagemaker(sub) -> None:
    p = sub.add_parser(
        "sagemaker", help="train and serve through SageMaker (managed, local mode, or local-process without Docker)"
    )
    commands = p.add_subparsers(dest="sagemaker_command", required=True)

    def command(name: str, func, help: str, **kw) -> argparse.ArgumentParser:
        c = commands.add_parser(name, help=help, description=kw.pop("description", help), **kw)
        c.add_argument("--job-dir", default="runs/sagemaker", help="where the job's files and its record go (default: runs/sagemaker)")
        c.set_defaults(func=func)
        return c

    def aws_options(c: argparse.ArgumentParser) -> None:
        c.add_argument("--role", help="SageMaker execution role ARN for ml.* (default: $SAGEMAKER_ROLE)")
        c.add_argument("--region", help="AWS region for ml.* (default: the AWS configuration's)")

    c = command(
        "train", _sagemaker_train, "run the training job", allow_abbrev=False,
        description="Run the training job. Every other --name value option is a hyperparameter for the entry "
        "point, e.g. --epochs 3 --image-size 160 (all: python -m covid_xray.sagemaker.entry --help).",
    )
    c.add_argument("--data", help="dataset folder: DIR/train and DIR/test become the train and test channels")
    c.add_argument("--train", help="train channel: a folder, file:// or s3:// URI")
    c.add_argument("--test", help="test channel (optional): a folder, file:// or s3:// URI")
    c.add_argument("--instance-type", help="local-process, local, local_gpu or ml.* (default: local with Docker, else local-process)")
    c.add_argument("--instance-count", type=int, default=1, help="instances; more than 1 trains under torchrun")
    aws_options(c)
    c.set_defaults(accepts_extra=True)

    c = command("deploy", _sagemaker_deploy, "serve the job's model.tar.gz as an endpoint")
    c.add_argument("--instance-type", help="default: the training job's")
    c.add_argument("--port", type=int, help="local-process: the loopback port (default: a free one)")
    aws_options(c)

    c = command("predict", _sagemaker_predict, "send X-ray images to the deployed endpoint")
    c.add_argument("images", nargs="+", metavar="IMAGE")
    c.add_argument("--json", action="store_true", help="print one JSON array, an object per image")

    command("cleanup", _sagemaker_cleanup, "delete the deployed endpoint")


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(prog="covid-xray", description="Chest X-ray triage: train, evaluate, predict.")
    parser.add_argument("--version", action="version", version=f"covid-xray {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="fine-tune a pretrained CNN and evaluate it on the test split")
    p.add_argument("--data", action="append", metavar="[NAME=]PATH", help=DATA_HELP)
    p.add_argument("--holdout-source", metavar="NAME",
                   help="train without this source and test on all its images (the other sources' test split "
                        "is reported too, as test_in_sources)")
    p.add_argument("--out", help="run folder (default: runs/<timestamp>)")
    p.add_argument("--backbone", default="tf_efficientnet_lite0", help="any timm model name")
    p.add_argument("--weights", default="imagenet", help="imagenet | none | path to a state dict")
    p.add_argument("--epochs", type=int, default=16)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-3, help="head learning rate (backbone gets 0.3×)")
    p.add_argument("--patience", type=int, default=6, help="early-stopping patience in epochs")
    p.add_argument("--min-epochs", type=int, default=8,
                   help="no earlier epoch is selected or counts towards early stopping (default: 8)")
    p.add_argument("--image-size", type=int, help="input size (default: the backbone's pretraining size, at least 256)")
    p.add_argument("--freeze-stride", type=int, default=8, metavar="S",
                   help="keep the pretrained layers down to 1/S of the input resolution fixed (default: 8; "
                        "0 trains every layer)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--split-seed", type=int, default=0, help="seed for carving validation/test splits")
    p.add_argument("--skip-bad-images", action="store_true", help="skip unreadable files (counted in the report)")
    p.add_argument("--resume", action="store_true", help="continue from RUN/checkpoint.pt")
    p.add_argument("--no-amp", action="store_true", help="train in float32 even where bfloat16 is fast")
    p.add_argument("--no-onnx", action="store_true", help="do not add model.onnx to the bundle")
    p.add_argument("--fp32-depthwise", action=argparse.BooleanOptionalAction, default=True,
                   help="under bfloat16 on CPU, run the trainable 5×5 and stride-2 depthwise convolutions in float32, "
                        "whose bf16 backward is slow: a third off each step on CPUs with AMX/AVX512-BF16 (default: on)")
    p.add_argument("--nproc", type=int, default=1, help="train with N processes via torchrun (DDP; gloo on CPU)")
    p.set_defaults(func=_train)

    p = sub.add_parser("evaluate", help="re-evaluate a bundle on a dataset split")
    p.add_argument("bundle")
    p.add_argument("--data", action="append", metavar="[NAME=]PATH",
                   help="the data the bundle was trained on: every source again, under the same names")
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
    p.add_argument("--out", help="write predictions to this CSV file, row by row")
    p.add_argument("--resume", action="store_true", help="keep the rows already in --out and predict only the other files")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--workers", type=int, help="decoding processes (default: 0 for a few files, else up to 4)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    p.add_argument("--backend", help=BACKEND_HELP)
    p.set_defaults(func=_predict)

    p = sub.add_parser("export", help="add ONNX graphs (fp32, optionally int8) to a bundle for fast CPU inference")
    p.add_argument("bundle")
    p.add_argument("--onnx", action="store_true", help="write model.onnx (uint8 image in, logits out, dynamic batch)")
    p.add_argument("--int8", action="store_true", help="also write model.int8.onnx, calibrated on training images")
    p.add_argument("--data", action="append", metavar="[NAME=]PATH",
                   help="the training data, for int8 calibration; every source, as in train (default: $COVID_XRAY_DATA)")
    p.add_argument("--calibration-images", type=int, default=128, help="training images used to calibrate int8")
    p.set_defaults(func=_export)

    p = sub.add_parser("audit", help="check a dataset: duplicates, leakage between splits, unreadable files, shortcuts")
    p.add_argument("data", nargs="*", metavar="[NAME=]PATH", help=DATA_HELP)
    # --data too, as in train and evaluate (and as the dataset-not-found message suggests).
    p.add_argument("--data", dest="data_option", action="append", help=argparse.SUPPRESS)
    p.add_argument("--json", action="store_true", help="print the audit as JSON")
    # The default lives in audit.NEAR_THRESHOLD; importing it here would slow every command's start.
    p.add_argument("--near-threshold", type=int, metavar="BITS",
                   help="near duplicates: perceptual hashes at most this many of 256 bits apart (default 32)")
    p.set_defaults(func=_audit)

    p = sub.add_parser("serve", help="serve a bundle over HTTP (SageMaker protocol) with a web page")
    p.add_argument("bundle")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (0.0.0.0 to accept other machines)")
    p.add_argument("--port", type=int, default=8080)
    p.add_argument("--workers", type=int, default=1, help="server processes, each with its own model")
    p.add_argument("--max-batch-size", type=int, default=8, help="most images in one forward pass")
    p.add_argument("--max-wait-ms", type=float, default=5.0, help="longest a batch waits for more requests")
    p.add_argument("--queue-size", type=int, default=64, help="images waiting beyond which requests get 503")
    p.add_argument("--max-body-mb", type=float, default=20.0, help="largest request body accepted (413 above)")
    p.add_argument("--max-instances", type=int, default=32, help="most images in one JSON request")
    p.add_argument("--inference-threads", type=int, help="threads running the shared model (default: min(2, CPUs per worker))")
    p.add_argument("--backend", help=BACKEND_HELP)
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    p.set_defaults(func=_serve)

    p = sub.add_parser("explain", help="Grad-CAM: write the X-ray with a heatmap of where the model looked")
    p.add_argument("bundle")
    p.add_argument("image")
    p.add_argument("-o", "--out", required=True, help="PNG file to write: the X-ray as the model saw it, heatmap overlaid")
    p.add_argument("--class", dest="class_name", metavar="NAME", help="class to explain (default: the predicted one)")
    p.set_defaults(func=_explain)

    _add_sagemaker(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser()
    # Only `sagemaker train` takes free-form options: its hyperparameters, passed to the entry point.
    args, args.extra = parser.parse_known_args(argv)
    if args.extra and not getattr(args, "accepts_extra", False):
        parser.error(f"unrecognized arguments: {' '.join(args.extra)}")
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
