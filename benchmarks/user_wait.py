"""What a user waits for: `covid-xray predict` on one JPEG from a fresh process, and the minute after the
last epoch of a default `covid-xray train` (evaluation, calibration, guard, probes, export).

    python benchmarks/user_wait.py --data DIR [--before REV] [--runs 5] [--no-train] [--folder DIR]

Measures the working tree's package and, with --before, the package at git revision REV (its `src/`,
unpacked into a temporary folder), in one run on one machine, so that the two columns compare. Both
trainings use the same defaults and seed; their metrics.json are compared leaf by leaf (timing aside),
and the fresh-process predictions use the working tree's bundle for both versions, so only the code differs.
The post-fit time is the process's end minus the moment `training.fit` returned, the same measure for
any revision.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

from _common import machine, print_table

ROOT = Path(__file__).resolve().parents[1]

# Runs the CLI with `training.fit` wrapped to print when it returns: the boundary between fit and post-fit.
HARNESS = """
import sys, time
if sys.argv[1] == "train":  # `predict` must not import the training module (it imports torch)
    import covid_xray.training as training
    fit = training.fit
    def timed_fit(*args, **kwargs):
        result = fit(*args, **kwargs)
        print(f"BENCH fit_end {time.time()}", flush=True)
        return result
    training.fit = timed_fit
from covid_xray.cli import main
code = main(sys.argv[1:])
print("BENCH heavy", ",".join(m for m in ("torch", "timm") if m in sys.modules), flush=True)
sys.exit(code)
"""


def source_at(rev: str, folder: Path) -> Path:
    """The package's `src/` as it was at git revision `rev`."""
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", "--format=tar", rev, "src"], capture_output=True,
                             check=True).stdout
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(folder, filter="data")
    return folder / "src"


def run(src: Path, args: list[str]) -> tuple[float, dict[str, str]]:
    """Wall seconds of one fresh `covid-xray ARGS` process with `src` first on the path, and its BENCH lines."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(src), os.environ.get("PYTHONPATH")]))}
    started = time.time()
    result = subprocess.run([sys.executable, "-c", HARNESS, *args], env=env, capture_output=True, text=True, check=False)
    wall = time.time() - started
    if result.returncode not in (0, 1):  # 1: predict's "some file failed", not a crash
        sys.exit(f"covid-xray {' '.join(args)} failed:\n{result.stderr[-3000:]}")
    marks = dict(line.split(" ", 2)[1:] for line in result.stdout.splitlines() if line.startswith("BENCH "))
    return wall, {**marks, "started": str(started)}


def train(src: Path, data: str, out: Path) -> dict[str, float]:
    wall, marks = run(src, ["train", "--data", data, "--out", str(out)])
    post_fit = float(marks["started"]) + wall - float(marks["fit_end"])
    return {"total": wall, "post_fit": post_fit}


def numeric_leaves(value, prefix: str = "") -> dict[str, float]:
    if isinstance(value, dict):
        return {k: v for key, item in value.items() for k, v in numeric_leaves(item, f"{prefix}/{key}").items()}
    if isinstance(value, list):
        return {k: v for i, item in enumerate(value) for k, v in numeric_leaves(item, f"{prefix}/{i}").items()}
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return {prefix: float(value)}
    return {}


def compare_metrics(before: Path, after: Path) -> str:
    old, new = (numeric_leaves({k: v for k, v in json.loads(p.read_text()).items() if k != "timing"})
                for p in (before, after))
    shared = old.keys() & new.keys()
    worst = max(shared, key=lambda k: abs(old[k] - new[k]))
    return (f"metrics.json: {len(shared)} shared numbers, largest difference {abs(old[worst] - new[worst]):.2e} "
            f"({worst}); only before: {len(old.keys() - shared)}, only after: {len(new.keys() - shared)}")


def backend_parity(bundle: Path, data: str) -> str:
    """Largest probability difference between eager PyTorch and the bundle's ONNX graph on its test split."""
    sys.path.insert(0, str(ROOT / "src"))
    import numpy as np

    from covid_xray.evaluation import trained_dataset
    from covid_xray.images import decode_samples
    from covid_xray.inference import Predictor

    config = Predictor.from_bundle(bundle).config
    images = decode_samples(trained_dataset(config, data)["test"], config.input_size).images[:]
    onnx, torch = (Predictor.from_bundle(bundle, backend=b).probabilities(images) for b in ("onnx", "torch"))
    return f"test split, {len(images)} films: max |probability difference| ONNX vs eager PyTorch {np.abs(onnx - torch).max():.1e}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", default=os.environ.get("COVID_XRAY_DATA"), required="COVID_XRAY_DATA" not in os.environ)
    parser.add_argument("--before", metavar="REV", help="also measure the package at this git revision")
    parser.add_argument("--runs", type=int, default=5, help="fresh `predict` processes per version")
    parser.add_argument("--bundle", type=Path, help="predict with this bundle instead of training one (implies --no-train)")
    parser.add_argument("--no-train", action="store_true")
    parser.add_argument("--folder", type=Path, help="also time `covid-xray predict --out` over every film of this folder")
    args = parser.parse_args()
    print(f"machine: {machine()}\n")
    with tempfile.TemporaryDirectory() as tmp:
        versions = {"now": ROOT / "src"}
        if args.before:
            versions[f"before ({args.before})"] = source_at(args.before, Path(tmp) / "before")
        rows = {name: {"version": name} for name in versions}
        bundle = args.bundle
        if not (args.no_train or args.bundle):
            for i, (name, src) in enumerate(versions.items()):
                times = train(src, args.data, Path(tmp) / f"run{i}")
                rows[name].update({"train s": f"{times['total']:.1f}", "post-fit s": f"{times['post_fit']:.1f}"})
            bundle = Path(tmp) / "run0" / "model"
        if bundle is None:
            sys.exit("--no-train needs --bundle")
        film = next(p for p in sorted((Path(args.data) / "test" / "Covid").iterdir()) if p.is_file())
        for name, src in versions.items():
            walls, heavy = [], ""
            for _ in range(args.runs):
                wall, marks = run(src, ["predict", str(bundle), str(film), "--json"])
                walls.append(wall)
                heavy = marks.get("heavy", "")
            rows[name].update({"predict 1 JPEG min s": f"{min(walls):.2f}",
                               "median s": f"{statistics.median(walls):.2f}", "imports": heavy or "neither torch nor timm"})
            if args.folder:  # thousands of files: decoding must still overlap the model
                wall, _ = run(src, ["predict", str(bundle), str(args.folder), "--out", str(Path(tmp) / f"{name}.csv"),
                                    "--no-progress"])
                films = sum(1 for _ in open(Path(tmp) / f"{name}.csv")) - 1
                rows[name][f"predict {films} films s"] = f"{wall:.1f}"
        print_table(list(rows.values()))
        print()
        if args.before and not (args.no_train or args.bundle):
            print(compare_metrics(Path(tmp) / "run1" / "metrics.json", Path(tmp) / "run0" / "metrics.json"))
            timing = json.loads((Path(tmp) / "run0" / "metrics.json").read_text())["timing"]
            print(f"now, as metrics.json records it: {timing}")
        print(backend_parity(bundle, args.data))


if __name__ == "__main__":
    main()
