"""`covid-xray` commands: parse arguments, call one stage, print. Heavy imports stay inside commands
so that `covid-xray predict` starts fast."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from .config import add_train_options
from .errors import CovidXrayError
from .sagemaker import commands as sagemaker_commands

BACKEND_HELP = ("auto (ONNX Runtime when the bundle has model.onnx, else PyTorch) | torch | onnx | onnx-int8; "
                "default: $COVID_XRAY_BACKEND, else auto")

DATA_HELP = ("dataset folder or CSV manifest; repeat for several sources, each NAME=PATH or PATH (named after "
             "its folder) (default: $COVID_XRAY_DATA, then ./data/Covid19-dataset)")


def _launch_torchrun(nproc: int, argv: list[str]) -> int:
    """`train --nproc N`: rerun this same command under torchrun with N local processes."""
    import os
    import subprocess

    from .util import cpu_count

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
    env = {"OMP_NUM_THREADS": str(max(1, cpu_count() // nproc)), **os.environ}
    return subprocess.call(cmd, env=env)


def _train(args: argparse.Namespace) -> int:
    import os

    if args.nproc > 1 and "WORLD_SIZE" not in os.environ:
        return _launch_torchrun(args.nproc, args.argv)
    from .config import train_config
    from .data import parse_sources
    from .training import train_run

    out = Path(args.out or f"runs/{time.strftime('%Y%m%d-%H%M%S')}")
    result = train_run(
        train_config(args), parse_sources(args.data), out, resume=args.resume, log=lambda m: print(m, flush=True)
    )
    if result:  # None on the ranks of a distributed run that do not write
        print(f"bundle: {out / 'model'}")
        print(f"report: {result.report}")
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    from .evaluation import evaluate_bundle, evaluate_external
    from .inference import Predictor
    from .report import confusion_table, external_text, metrics_table, per_source_table

    predictor = Predictor.from_bundle(args.bundle, backend=args.backend)
    if args.external:
        result = evaluate_external(predictor.config, predictor.assess, args.data, skip_bad=args.skip_bad_images,
                                   n_boot=args.bootstrap)
        print(json.dumps(result, indent=2) if args.json else external_text(result, predictor.classes))
        return 0
    metrics = evaluate_bundle(predictor.config, predictor.probabilities, args.data, args.split,
                              skip_bad=args.skip_bad_images, n_boot=args.bootstrap)
    if args.json:
        print(json.dumps(metrics, indent=2))
        return 0
    classes = predictor.classes
    where = ", ".join(args.data) if args.data else "the dataset"
    holdout = predictor.config.hyperparameters.holdout_source
    title = f"held-out source {holdout}, all its images" if args.split == "test" and holdout else f"{args.split} split"
    main = metrics[args.split]
    print(f"{title} of {where}\n\n{metrics_table(main)}\n\n{confusion_table(main, classes)}")
    if "test_in_sources" in metrics:
        inside = metrics["test_in_sources"]
        print(f"\ntest split of the sources trained on (in-distribution)\n\n{metrics_table(inside)}"
              f"\n\n{confusion_table(inside, classes)}")
    dedup = metrics.get("test_dedup")
    if dedup and dedup["excluded"]:
        print(f"\nwithout the {len(dedup['excluded'])} test images that are copies of training/validation images "
              f"(covid-xray audit lists them)\n\n{metrics_table(dedup)}\n\n{confusion_table(dedup, classes)}")
    if "per_source" in metrics:
        print(f"\nper source\n\n{per_source_table(metrics['per_source'], holdout)}")
    return 0


def _quiet_omp() -> None:
    """Make idle OpenMP threads sleep instead of spin (read once, when torch loads). Spinning
    threads starve the decoding threads and the HTTP loop that share these cores with the model,
    and on a busy machine a spinning team turns a 30 ms forward pass into seconds."""
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def _check_site(args: argparse.Namespace) -> int:
    _quiet_omp()
    from .bulk_predict import expand_paths, iter_predictions
    from .inference import Predictor
    from .site_shift import Reference, check_predictions, table

    predictor = Predictor.from_bundle(args.bundle, backend=args.backend)
    if predictor.config.site_reference is None:
        raise CovidXrayError(f"{args.bundle} has no site reference (it was trained by an older covid-xray); "
                             f"retrain it with this version to check sites")
    rows = list(iter_predictions(predictor, expand_paths(args.paths), batch_size=args.batch_size))
    good = [r for r in rows if "error" not in r]
    for r in rows:
        if "error" in r:
            print(f"skipped {r['path']}: {r['error']}", file=sys.stderr)
    if not good:
        raise CovidXrayError("no readable image to check")
    result = check_predictions(Reference.from_dict(predictor.config.site_reference), good)
    if args.json:
        print(json.dumps({**result.to_dict(), "skipped_images": len(rows) - len(good)}, indent=2))
    else:
        print(result.verdict)
        print()
        print(table(result))
    return 0


def _predict(args: argparse.Namespace) -> int:
    _quiet_omp()
    from tqdm import tqdm

    from .bulk_predict import PredictionCSV, expand_paths, iter_predictions, print_predictions
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
        print_predictions(rows, predictor.classes)
    return 1 if errors else 0


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
    serve(args.bundle, host=args.host, port=args.port, workers=args.workers, settings=settings, access=_access(args),
          log_level=args.log_level, **_tls(args))
    return 0


def _access(args: argparse.Namespace):
    from .access import KEYS_ENV, AccessSettings, read_keys

    keys = read_keys(args.api_key_file, os.environ.get(KEYS_ENV))
    return AccessSettings.for_host(args.host, keys, args.rate_limit, allow_unauthenticated=args.allow_unauthenticated)


def _tls(args: argparse.Namespace) -> dict[str, str | None]:
    """uvicorn's TLS options; both files or neither, each readable (checked here, not in uvicorn's traceback)."""
    files = {"ssl_certfile": args.ssl_certfile, "ssl_keyfile": args.ssl_keyfile}
    if any(files.values()) and not all(files.values()):
        raise CovidXrayError("HTTPS needs both --ssl-certfile (the certificate) and --ssl-keyfile (its private key)")
    for option, path in files.items():
        if path and not os.access(path, os.R_OK):
            raise CovidXrayError(f"cannot read --{option.replace('_', '-')} {path}")
    return files


def _audit(args: argparse.Namespace) -> int:
    from .audit import audit_dataset
    from .data import discover, parse_sources
    from .duplicates import NEAR_THRESHOLD

    threshold = NEAR_THRESHOLD if args.near_threshold is None else args.near_threshold
    report = audit_dataset(discover(parse_sources(args.data + (args.data_option or []))), near_threshold=threshold)
    print(json.dumps(report.to_dict(), indent=2) if args.json else report.to_markdown(heading="#"))
    return 0


def _export(args: argparse.Namespace) -> int:
    from .export import export_bundle

    if not args.onnx:
        raise CovidXrayError("nothing to export: pass --onnx (and --int8 for the quantised variant too)")
    config = export_bundle(args.bundle, int8=args.int8, data=args.data, calibration_images=args.calibration_images)
    print("bundle files: " + ", ".join(sorted(config.files)))
    return 0


def _explain(args: argparse.Namespace) -> int:
    import numpy as np

    from .explain import gradcam, overlay
    from .inference import Predictor
    from .util import atomic_path

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
    try:
        with atomic_path(out) as tmp:  # never leave a half-written PNG under the real name
            picture.save(tmp, format="PNG")
    except OSError as e:
        raise CovidXrayError(f"cannot write {out}: {e.strerror or e}") from None
    print(f"predicted: {predictor.classes[predicted]} (probability {probs[predicted]:.4f})")
    print(f"heatmap: {out} (class {predictor.classes[target]}, probability {probs[target]:.4f})")
    return 0


def _download(args: argparse.Namespace) -> int:
    import shlex

    from .download import download

    dest = download(args.dest, log=lambda m: print(m, flush=True))
    print(f"next: covid-xray train --data {shlex.quote(str(dest))}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(prog="covid-xray", description="Chest X-ray triage: train, evaluate, predict.")
    parser.add_argument("--version", action="version", version=f"covid-xray {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="fine-tune a pretrained CNN and evaluate it on the test split")
    p.add_argument("--data", action="append", metavar="[NAME=]PATH", help=DATA_HELP)
    p.add_argument("--out", help="run folder (default: runs/<timestamp>)")
    p.add_argument("--resume", action="store_true", help="continue from RUN/checkpoint.pt")
    add_train_options(p)
    p.add_argument("--nproc", type=int, default=1, help="train with N processes via torchrun (DDP; gloo on CPU)")
    p.set_defaults(func=_train)

    p = sub.add_parser("evaluate", help="re-evaluate a bundle on a dataset split, or on another site's labelled films")
    p.add_argument("bundle")
    p.add_argument("--data", action="append", metavar="[NAME=]PATH",
                   help="the data the bundle was trained on: every source again, under the same names")
    p.add_argument("--split", default="test", choices=["train", "val", "test"])
    p.add_argument("--external", action="store_true",
                   help="evaluate on every image of one labelled folder the bundle was not trained on "
                        "(--data NAME=DIR: another site's films), with the referral table")
    p.add_argument("--json", action="store_true", help="print metrics as JSON")
    p.add_argument("--bootstrap", type=int,
                   help="bootstrap resamples for the confidence intervals (default: as in training)")
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
    p.add_argument("--workers", type=int, help="decoding threads (default: one per usable core; 0: decode in the main thread)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    p.add_argument("--backend", help=BACKEND_HELP)
    p.set_defaults(func=_predict)

    p = sub.add_parser("check-site", help="do a new site's (unlabelled) films look like the training data?")
    p.add_argument("bundle")
    p.add_argument("paths", nargs="+", metavar="PATH", help="the site's films: files or folders")
    p.add_argument("--json", action="store_true", help="print the check as JSON")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--backend", help=BACKEND_HELP)
    p.set_defaults(func=_check_site)

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
    # The default lives in duplicates.NEAR_THRESHOLD; importing it here would slow every command's start.
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
    p.add_argument("--api-key-file", metavar="FILE",
                   help="require 'Authorization: Bearer KEY' with one of the keys in FILE (one a line) on every route "
                        "but /ping and the page's files; keys can also come from $COVID_XRAY_API_KEYS")
    p.add_argument("--allow-unauthenticated", action="store_true",
                   help="serve beyond loopback without API keys (refused otherwise)")
    p.add_argument("--rate-limit", type=float, metavar="N",
                   help="requests a minute per client address, 429 beyond (default: off on loopback, else 120; 0: off)")
    p.add_argument("--ssl-certfile", metavar="PEM", help="serve HTTPS with this certificate (chain)")
    p.add_argument("--ssl-keyfile", metavar="PEM", help="the certificate's private key")
    p.set_defaults(func=_serve)

    p = sub.add_parser("explain", help="Grad-CAM: write the X-ray with a heatmap of where the model looked")
    p.add_argument("bundle")
    p.add_argument("image")
    p.add_argument("-o", "--out", required=True, help="PNG file to write: the X-ray as the model saw it, heatmap overlaid")
    p.add_argument("--class", dest="class_name", metavar="NAME", help="class to explain (default: the predicted one)")
    p.set_defaults(func=_explain)

    p = sub.add_parser("download", help="download the Kaggle dataset with kagglehub (needs Kaggle credentials)")
    p.add_argument("--dest", default="data/Covid19-dataset",
                   help="folder to create with train/ and test/ (default: data/Covid19-dataset, where train looks)")
    p.set_defaults(func=_download)

    sagemaker_commands.add_parser(sub)
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
