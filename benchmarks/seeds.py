"""Default training, several seeds: test accuracy, Covid sensitivity and wall time per run.

    python benchmarks/seeds.py [--data DIR] [--seeds 0 1 2] [--out runs/seeds] [--train-args "--image-size 288"]

Each run is the real command, `covid-xray train --data DIR --out OUT/seedS --seed S`, timed from
process start to exit. Test metrics are on the untouched test split, with and without the test
images that copy training images (see `covid-xray audit`), and with the referral rule applied (the share
of films the model refers to a radiologist, the accuracy on the others, and Covid films detected or referred).

To compare training settings without touching the test split, point --data at the training images
alone (DIR/train): the run then carves its own test split out of them, and --train-args holds the
settings under comparison.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=os.environ.get("COVID_XRAY_DATA", "data/Covid19-dataset"))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--out", default="runs/seeds")
    parser.add_argument("--train-args", default="", help="more `covid-xray train` options, in one string")
    args = parser.parse_args()

    rows = []
    for seed in args.seeds:
        out = Path(args.out) / f"seed{seed}"
        started = time.perf_counter()
        subprocess.run([sys.executable, "-m", "covid_xray.cli", "train", "--data", args.data, "--out", str(out),
                        "--seed", str(seed), *shlex.split(args.train_args)], check=True, stdout=subprocess.DEVNULL)
        wall = time.perf_counter() - started
        metrics = json.loads((out / "metrics.json").read_text())
        training = json.loads((out / "model" / "config.json").read_text())["training"]
        rows.append((seed, wall, metrics, f"{training['best_epoch']} of {training['epochs_run']}"))

    print("| seed | test accuracy (95% CI) | log loss | Covid sensitivity | accuracy without leaked test images "
          "| referred | accuracy of the rest | Covid detected or referred | selected epoch | wall |")
    print("| ---: | --- | ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: |")
    for seed, wall, metrics, epoch in rows:
        test, dedup, referral = metrics["test"], metrics.get("test_dedup"), metrics["referral"]["test"]
        lo, hi = test["ci95"]["accuracy"]
        dd = f"{dedup['accuracy']:.3f} (n={dedup['n']})" if dedup else "n/a"
        print(f"| {seed} | {test['accuracy']:.3f} ({lo:.3f}–{hi:.3f}) | {test['log_loss']:.3f} "
              f"| {test['per_class']['Covid']['sensitivity']:.3f} | {dd} | {referral['referred_rate']:.0%} | {referral['accuracy_not_referred']:.3f} "
              f"| {referral['covid_sensitivity_with_referral']:.3f} | {epoch} | {wall:.0f} s |")
    accs = [m["test"]["accuracy"] for _, _, m, _ in rows]
    losses = [m["test"]["log_loss"] for _, _, m, _ in rows]
    perfect = sum(m["test"]["per_class"]["Covid"]["sensitivity"] == 1.0 for _, _, m, _ in rows)
    print(f"\nmean test accuracy {statistics.mean(accs):.3f} (range {min(accs):.3f}–{max(accs):.3f}) over {len(rows)} seeds "
          f"(n={rows[0][2]['test']['n']} test images each), mean log loss {statistics.mean(losses):.3f}; "
          f"Covid sensitivity 1.00 in {perfect} of {len(rows)} seeds")


if __name__ == "__main__":
    main()
