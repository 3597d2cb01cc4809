"""A CSV manifest of a dataset without the files known to be mislabelled (`covid_xray.known_labels`: in the
Kaggle dataset, the SARS figures filed as Covid).

    python benchmarks/without_sars.py [--data ../shared/data/Covid19-dataset] [--out runs/kaggle-without-sars.csv]

In the Kaggle dataset `train/Covid/040`–`059` are near-identical to SARS figures of a 2004 RadioGraphics article
(doi 10.1148/rg.242035193), not COVID-19 films (../shared/DESIGN.md). The manifest lists every other
file with its class and split, so `covid-xray train --data runs/kaggle-without-sars.csv` (or
`benchmarks/cross_site.py --data ...`) trains without them and tests on the same test split.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import os
from pathlib import Path

from covid_xray.data import labelled_files
from covid_xray.known_labels import MISLABELLED


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=os.environ.get("COVID_XRAY_DATA", "../shared/data/Covid19-dataset"))
    parser.add_argument("--out", default="runs/kaggle-without-sars.csv")
    args = parser.parse_args()
    root = Path(args.data).resolve()
    rows, dropped = [], []
    for split in ("train", "test"):
        for path, label in labelled_files(root / split):
            known = hashlib.sha256(path.read_bytes()).hexdigest() in MISLABELLED
            (dropped if known else rows).append((str(path), label, split))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["path", "label", "split"])
        writer.writerows(rows)
    print(f"{out}: {len(rows)} files; left out {len(dropped)}: {', '.join(Path(p).name for p, _, _ in dropped)}")


if __name__ == "__main__":
    main()
