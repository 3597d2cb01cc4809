"""`covid-xray sagemaker train|deploy|predict|transform|cleanup`: parse, call the launcher, print. Imports nothing
heavy until a command runs, like the rest of the CLI."""

from __future__ import annotations

import argparse
import json
import os
import signal
import time
from pathlib import Path

from ..errors import CovidXrayError


def _sagemaker_train(args: argparse.Namespace) -> int:
    from . import entry, launcher

    if bool(args.data) == bool(args.train):
        raise CovidXrayError("pass either --data DIR or --train PATH_OR_URI [--test PATH_OR_URI]")
    inputs = launcher.channels(args.data) if args.data else {"train": args.train, **({"test": args.test} if args.test else {})}
    job = launcher.train(
        inputs, instance_type=args.instance_type, instance_count=args.instance_count,
        hyperparameters=entry.parse_hyperparameter_args(args.extra), out=args.job_dir, role=args.role,
        region=args.region, sdk=args.sdk, image=args.image_uri, log=lambda line: print(line, flush=True),
    )
    print(f"job: {job.name}\nmodel_data: {job.model_data}")
    if job.output_dir:
        print(f"output: {job.output_dir}")
    print(f"next: covid-xray sagemaker deploy --job-dir {args.job_dir}")
    return 0


def _sagemaker_deploy(args: argparse.Namespace) -> int:
    from . import jobs, launcher

    job = jobs.TrainingJob(**launcher.load_state(args.job_dir)["job"])
    endpoint = launcher.deploy(job, instance_type=args.instance_type, role=args.role, region=args.region, port=args.port,
                               sdk=args.sdk, image=args.image_uri)
    described = endpoint.describe()
    local = described["kind"] in jobs.LOCAL_MODES
    # A local-mode endpoint lives as long as this process: `cleanup` from another terminal interrupts it (pid).
    launcher.save_state(args.job_dir, endpoint=described | {"pid": os.getpid()} if local else described)
    print(f"endpoint: {described.get('url') or described['name']}")
    if local:
        # SIGTERM (what `cleanup` sends) ends it as Ctrl-C does; SIGINT too where a shell started it ignoring SIGINT.
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, signal.default_int_handler)
        print("serving until Ctrl-C (or 'covid-xray sagemaker cleanup' from another terminal)", flush=True)
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
    from ..bulk_predict import print_predictions
    from . import launcher

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
        print_predictions(rows, classes)
    return 0


def _sagemaker_transform(args: argparse.Namespace) -> int:
    from . import jobs, launcher

    job = jobs.TrainingJob(**launcher.load_state(args.job_dir)["job"])
    result = launcher.transform(job, args.input, args.output, instance_type=args.instance_type,
                                concurrency=args.concurrency, role=args.role, region=args.region, sdk=args.sdk,
                                image=args.image_uri, log=lambda line: print(line, flush=True))
    print(result.summary())
    return 1 if result.errors else 0


def _sagemaker_cleanup(args: argparse.Namespace) -> int:
    from . import launcher

    endpoint = launcher.recorded_endpoint(args.job_dir)
    if endpoint is None:
        print("no endpoint to delete")
        return 0
    endpoint.delete_endpoint()
    launcher.save_state(args.job_dir, endpoint=None)
    print("endpoint deleted")
    return 0


def add_parser(sub) -> None:
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
        c.add_argument("--sdk", choices=("v2", "v3"),
                       help="SageMaker Python SDK line for local and ml.* (default: the installed one)")

    def image_option(c: argparse.ArgumentParser) -> None:
        c.add_argument("--image-uri", help="container image (default: $COVID_XRAY_SAGEMAKER_IMAGE, else AWS's PyTorch "
                       "image; local mode falls back to the one 'make sagemaker-image' builds)")

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
    image_option(c)
    c.set_defaults(accepts_extra=True)

    c = command("deploy", _sagemaker_deploy, "serve the job's model.tar.gz as an endpoint")
    c.add_argument("--instance-type", help="default: the training job's")
    c.add_argument("--port", type=int, help="local-process: the loopback port (default: a free one)")
    aws_options(c)
    image_option(c)

    c = command("predict", _sagemaker_predict, "send X-ray images to the deployed endpoint")
    c.add_argument("images", nargs="+", metavar="IMAGE")
    c.add_argument("--json", action="store_true", help="print one JSON array, an object per image")

    c = command("transform", _sagemaker_transform, "batch transform: every file of a folder or S3 prefix "
                "through the job's model, one FILE.out each")
    c.add_argument("--input", required=True, help="a folder (or file), or an s3:// prefix for ml.*")
    c.add_argument("--output", required=True, help="where FILE.out (and FILE.error) go: a folder, or s3:// for ml.*")
    c.add_argument("--instance-type", help="default: the training job's")
    c.add_argument("--concurrency", type=int, default=4, help="requests in flight at once (MaxConcurrentTransforms)")
    aws_options(c)
    image_option(c)

    command("cleanup", _sagemaker_cleanup, "delete the deployed endpoint")
