"""Bulk prediction over files: folders of thousands of images → one prediction row each (`covid-xray
predict`). Owns expanding paths to image files, the DataLoader that decodes them, `iter_predictions`
and `PredictionCSV`. Not to be confused with the server's micro-batcher (`batcher.py`).

Files are decoded in DataLoader worker processes while the model predicts the previous batch;
results stream out in input order, so a CSV can be written (and flushed) as they come and a run
that stopped can `--resume` where it left off. An unreadable file becomes an error row.
"""

from __future__ import annotations

import csv
import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, Self

import numpy as np

from .images import load_image
from .errors import CovidXrayError, ImageError
from .inference import Predictor
from .util import cpu_count

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".dcm", ".dicom"}


def expand_paths(paths: Iterable[str | os.PathLike]) -> list[Path]:
    """Files as given, plus every image file under each folder (sorted, recursively)."""
    paths = [Path(p) for p in paths]
    files: list[Path] = []
    for p in paths:
        if p.is_dir():
            files += sorted(f for f in p.rglob("*") if f.suffix.lower() in IMAGE_SUFFIXES and f.is_file())
        else:
            files.append(p)
    if not files:
        raise CovidXrayError(f"no images found in {' '.join(map(str, paths))}")
    return files


class _Images:
    """Map-style dataset: index → (index, uint8 image or None, error or None). Never raises on a bad
    file, so one corrupt image cannot stop a run of thousands."""

    def __init__(self, paths: list[Path], size: int):
        self.paths, self.size = paths, size

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[int, np.ndarray | None, str | None]:
        try:
            return i, load_image(self.paths[i], self.size), None
        except ImageError as e:
            return i, None, str(e).removeprefix(f"{self.paths[i]}: ")


# Per-prediction flags, as CSV columns after the probabilities (refer_reasons joined by "; ").
FLAGS = ("ood", "ood_score", "atypical", "class_distance", "refer", "refer_reasons")


def _keep_as_list(items):  # module level: DataLoader workers pickle the collate function
    return items


def default_workers(n_files: int, batch_size: int) -> int:
    # Worker processes cost ~a second to start: not worth it for a batch or two.
    return 0 if n_files <= 2 * batch_size else min(4, cpu_count())


def iter_predictions(predictor: Predictor, paths: list[Path], *, batch_size: int = 32,
                     workers: int | None = None) -> Iterator[dict[str, Any]]:
    """Yield one row per path, in order: `path`, then the prediction (`label`, `probabilities`, `ood`,
    `ood_score`, `atypical`, `class_distance`, `refer`, `refer_reasons`), or `error`."""
    from torch.utils.data import DataLoader

    workers = default_workers(len(paths), batch_size) if workers is None else workers
    loader = DataLoader(_Images(paths, predictor.size), batch_size=batch_size, num_workers=workers,
                        collate_fn=_keep_as_list, prefetch_factor=2 if workers else None)
    for batch in loader:
        good = [(i, image) for i, image, _ in batch if image is not None]
        scores = predictor.score(np.stack([image for _, image in good])) if good else []
        by_index = {i: predictor.result(s) for (i, _), s in zip(good, scores)}
        for i, _, error in batch:
            yield {"path": str(paths[i]), **by_index[i]} if error is None else {"path": str(paths[i]), "error": error}


class PredictionCSV:
    """`path,label,<class>…,ood,ood_score,atypical,class_distance,refer,refer_reasons,error` rows, flushed one batch at a time.

    With `resume`, the rows already in the file are kept (a half-written last line from a killed
    run is dropped) and `done` lists their paths, so only the rest needs predicting.
    """

    def __init__(self, path: str | os.PathLike, classes: list[str], *, resume: bool = False):
        self.path, self.classes = Path(path), classes
        self.header = ["path", "label", *classes, *FLAGS, "error"]
        self.done: set[str] = set()
        exists = resume and self.path.is_file() and self.path.stat().st_size > 0
        if exists:
            self.done = self._read_done()
        # Held open across many writes (closed by close()/__exit__), so rows stream out as they come.
        self._file = open(self.path, "a" if exists else "w", newline="", encoding="utf-8")
        self._writer = csv.writer(self._file)
        if not exists:
            self._writer.writerow(self.header)
            self._file.flush()

    def _read_done(self) -> set[str]:
        data = self.path.read_bytes()
        if not data.endswith(b"\n"):  # a run killed mid-row: drop the partial row
            data = data[: data.rfind(b"\n") + 1]
            self.path.write_bytes(data)
        rows = list(csv.reader(data.decode("utf-8").splitlines()))
        if not rows or rows[0] != self.header:
            raise CovidXrayError(
                f"{self.path} does not have the columns {','.join(self.header)}: it was written for another "
                f"model or by another program; choose another --out or drop --resume"
            )
        return {row[0] for row in rows[1:] if row}

    def write(self, rows: Iterable[dict[str, Any]]) -> None:
        for r in rows:
            probs = r.get("probabilities", {})
            flags = ["; ".join(r[f]) if isinstance(r.get(f), list) else "" if r.get(f) is None else r[f] for f in FLAGS]
            self._writer.writerow([r["path"], r.get("label", ""), *(probs.get(c, "") for c in self.classes), *flags,
                                   r.get("error", "")])
        self._file.flush()

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def print_predictions(rows: list[dict[str, Any]], classes: list[str]) -> None:
    """The table `predict` prints without --json: one row an image, its probabilities and flags."""
    width = max(len(r["path"]) for r in rows)
    print(f"{'image':<{width}}  {'label':<16}  " + "  ".join(f"{c:>16}" for c in classes) + "  flags")
    for r in rows:
        if "error" in r:
            print(f"{r['path']:<{width}}  error: {r['error']}")
            continue
        flags = ("NOT A CHEST X-RAY? (out of distribution): REFER" if r.get("ood")
                 else f"REFER: {'; '.join(r['refer_reasons'])}" if r.get("refer") else "")
        print(f"{r['path']:<{width}}  {r['label']:<16}  " + "  ".join(f"{r['probabilities'][c]:>16.4f}" for c in classes)
              + "  " + flags)
