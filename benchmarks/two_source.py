"""Kaggle-only against two-source training (Kaggle + radiography-dev), each source's test films side by side.

    python benchmarks/two_source.py [--kaggle DIR] [--rdb DIR] [--seed 0] [--out runs/two_source]
                                    [--train-args "..."]

Three runs of `covid-xray train` with the same seed (each skipped when OUT/NAME already holds a run of the
same command): `kaggle-only` (--data kaggle=KAGGLE), `two-source` (--data kaggle=... --data rdb=...) and
`kaggle-held-out` (two sources, --holdout-source kaggle: trained on radiography-dev alone, tested on every
Kaggle film). The other direction, radiography-dev never seen, is `kaggle-only`. Each source's test films
(every film of a source the run never trained on) go through `covid-xray evaluate --external`, so each row
has the test split's metrics and the referral table.
"""

from __future__ import annotations

import argparse
import csv
import json
import shlex
from pathlib import Path

from cross_site import covid_xray, train

from covid_xray.bundle import read_config
from covid_xray.data import labelled_files
from covid_xray.evaluation import trained_dataset


def test_manifests(run: Path, sources: dict[str, str], trained: list[str]) -> dict[str, Path]:
    """Per source, a CSV manifest of the films this run tested on: its test split, or all of a source it never saw."""
    config = read_config(run / "model")
    dataset = trained_dataset(config, [f"{n}={sources[n]}" for n in trained])
    manifests = {}
    for name, path in sources.items():
        if name in trained:
            rows = [(s.path, dataset.classes[s.label]) for s in dataset["test"] if s.source == name]
        else:
            rows = labelled_files(Path(path))
        manifests[name] = run / f"tested-{name}.csv"
        with open(manifests[name], "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["path", "label"])
            writer.writerows((str(Path(p).resolve()), label) for p, label in rows)
    return manifests


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kaggle", default="../shared/data/Covid19-dataset")
    parser.add_argument("--rdb", default="../shared/data/radiography-dev")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="runs/two_source")
    parser.add_argument("--train-args", default="", help="more `covid-xray train` options, in one string")
    args = parser.parse_args()
    sources = {"kaggle": args.kaggle, "rdb": args.rdb}
    extra = shlex.split(args.train_args)
    runs = {
        "kaggle-only": (["--data", f"kaggle={args.kaggle}"], ["kaggle"]),
        "two-source": (["--data", f"kaggle={args.kaggle}", "--data", f"rdb={args.rdb}"], ["kaggle", "rdb"]),
        "kaggle-held-out": (["--data", f"kaggle={args.kaggle}", "--data", f"rdb={args.rdb}",
                             "--holdout-source", "kaggle"], ["kaggle", "rdb"]),
    }
    print("| run | tested on | films | accuracy (95% CI) | referred | accuracy of the rest | confidently wrong "
          "| Covid called or referred |")
    print("| --- | --- | ---: | --- | ---: | ---: | ---: | ---: |")
    for name, (data, named) in runs.items():
        out = Path(args.out) / name
        train(data, out, args.seed, extra)
        for source, manifest in test_manifests(out, sources, named).items():
            result = json.loads(covid_xray("evaluate", str(out / "model"), "--data", f"{source}={manifest}",
                                           "--external", "--json", capture=True))
            m, r = result["external"], result["referral"]
            seen = "never seen" if source not in named or (name == "kaggle-held-out" and source == "kaggle") \
                else "test split"
            lo, hi = m["ci95"]["accuracy"]
            print(f"| {name} | {source} ({seen}) | {m['n']} | {m['accuracy']:.3f} ({lo:.3f}–{hi:.3f}) "
                  f"| {r['referred_rate']:.1%} | {r['accuracy_not_referred'] or 0:.3f} | {r['confidently_wrong_rate']:.1%} "
                  f"| {r['covid_sensitivity_with_referral']:.3f} |")


if __name__ == "__main__":
    main()
