"""Cross-site behaviour of the default training: the Kaggle test split next to films from another site.

    python benchmarks/cross_site.py [--data DIR] [--external rdb=DIR] [--seeds 0 1 2] [--out runs/cross_site]
                                    [--train-args "--backbone tf_efficientnet_lite1"]

Per seed: `covid-xray train --data DATA --out OUT/seedS --seed S` (skipped when OUT/seedS already holds a
bundle trained with the same options, so a second look at the same runs costs seconds), then
`covid-xray evaluate OUT/seedS/model --data EXTERNAL --external --json`. Both are the real commands.
The table gives, for the Kaggle test split and for the external films: accuracy (95% CI), the share
referred to a radiologist, the accuracy of the films not referred, confidently wrong (wrong and not
referred: the answers a triage team would act on, wrongly), Covid films called Covid or referred, and on
the external films the Normal films called Covid. The last row is the mean over seeds.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
from pathlib import Path

DEFAULT_EXTERNAL = "rdb=../shared/data/radiography-dev"


def covid_xray(*args: str, capture: bool = False) -> str:
    done = subprocess.run([sys.executable, "-m", "covid_xray.cli", *args], check=True, text=True,
                          stdout=subprocess.PIPE if capture else subprocess.DEVNULL)
    return done.stdout or ""


def train(data: list[str], out: Path, seed: int, train_args: list[str]) -> dict:
    """The run's metrics.json, training first unless `out` holds a run of exactly this command.
    `data`: the --data options (["--data", DIR, ...])."""
    command = ["train", *data, "--out", str(out), "--seed", str(seed), *train_args]
    stamp = out / "command.json"
    if not (stamp.exists() and json.loads(stamp.read_text()) == command and (out / "model" / "config.json").exists()):
        covid_xray(*command)
        stamp.write_text(json.dumps(command))
    return json.loads((out / "metrics.json").read_text())


def row(seed: int | str, test: dict, test_referral: dict, external: dict, classes: list[str]) -> dict[str, float]:
    ext, referral = external["external"], external["referral"]
    matrix = ext["confusion_matrix"]
    covid, normal = classes.index("Covid"), classes.index("Normal")
    return {
        "seed": seed,
        "kaggle accuracy": test["accuracy"], "kaggle lo": test["ci95"]["accuracy"][0],
        "kaggle hi": test["ci95"]["accuracy"][1],
        "kaggle referred": test_referral["referred_rate"],
        "kaggle rest accuracy": test_referral["accuracy_not_referred"],
        "kaggle confidently wrong": test_referral["confidently_wrong_rate"],
        "kaggle covid caught": test_referral["covid_sensitivity_with_referral"],
        "external accuracy": ext["accuracy"], "external lo": ext["ci95"]["accuracy"][0],
        "external hi": ext["ci95"]["accuracy"][1],
        "normal called covid": matrix[normal][covid],
        "external referred": referral["referred_rate"],
        "external rest accuracy": referral["accuracy_not_referred"] or 0.0,
        "external confidently wrong": referral["confidently_wrong_rate"],
        "external covid caught": referral["covid_sensitivity_with_referral"],
    }


def print_rows(rows: list[dict], site: str) -> None:
    print(f"| seed | Kaggle test accuracy (95% CI) | referred | accuracy of the rest | confidently wrong "
          f"| Covid called or referred | {site} accuracy (95% CI) | Normal → Covid | referred | accuracy of the rest "
          f"| confidently wrong | Covid called or referred |")
    print("| ---: | --- | ---: | ---: | ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        print(f"| {r['seed']} | {r['kaggle accuracy']:.3f} ({r['kaggle lo']:.3f}–{r['kaggle hi']:.3f}) "
              f"| {r['kaggle referred']:.1%} | {r['kaggle rest accuracy']:.3f} | {r['kaggle confidently wrong']:.1%} "
              f"| {r['kaggle covid caught']:.3f} "
              f"| {r['external accuracy']:.3f} ({r['external lo']:.3f}–{r['external hi']:.3f}) "
              f"| {r['normal called covid']:.0f} | {r['external referred']:.1%} | {r['external rest accuracy']:.3f} "
              f"| {r['external confidently wrong']:.1%} | {r['external covid caught']:.3f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=os.environ.get("COVID_XRAY_DATA", "../shared/data/Covid19-dataset"))
    parser.add_argument("--external", default=DEFAULT_EXTERNAL, help="NAME=DIR: labelled films of another site")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--out", default="runs/cross_site")
    parser.add_argument("--train-args", default="", help="more `covid-xray train` options, in one string")
    parser.add_argument("--json", action="store_true", help="print the rows as JSON instead of a table")
    args = parser.parse_args()

    rows = []
    for seed in args.seeds:
        out = Path(args.out) / f"seed{seed}"
        metrics = train(["--data", args.data], out, seed, shlex.split(args.train_args))
        external = json.loads(covid_xray("evaluate", str(out / "model"), "--data", args.external, "--external",
                                         "--json", capture=True))
        classes = json.loads((out / "model" / "config.json").read_text())["classes"]
        rows.append(row(seed, metrics["test"], metrics["referral"]["test"], external, classes))
    mean = {key: statistics.mean(r[key] for r in rows) for key in rows[0] if key != "seed"}
    rows.append({"seed": "mean", **mean})
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        print_rows(rows, args.external.split("=", 1)[0])


if __name__ == "__main__":
    main()
