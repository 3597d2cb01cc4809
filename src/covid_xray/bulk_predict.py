"""Bulk prediction over files: folders of thousands of images → one prediction row each (`covid-xray
predict`). Owns expanding paths to image files, the threads that decode them, `iter_predictions`
and `PredictionCSV`. Not to be confused with the server's micro-batcher (`batcher.py`).

Files are decoded in threads while the model predicts the previous batch;
results stream out in input order, so a CSV can be written (and flushed) as they come and a run
that stopped can `--resume` where it left off. An unreadable file becomes an error row.
"""

from __future__ import annotations

import csv
import os
from collections.abc import Iterable, Iterator
from functools import partial
from pathlib import Path
from typing import Any, Self

import numpy as np

from .images import load_image
from .errors import CovidXrayError, ImageError
from .inference import Predictor
from .util import cpu_count, ordered_map

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


def _decode(path: Path, size: int) -> tuple[np.ndarray | None, str | None]:
    """(uint8 image, None), or (None, why) for an unreadable file: one corrupt image cannot stop a run of thousands."""
    try:
        return load_image(path, size), None
    except ImageError as e:
        return None, str(e).removeprefix(f"{path}: ")


# Per-prediction flags, as CSV columns after the probabilities (refer_reasons joined by "; ").
FLAGS = ("ood", "ood_score", "atypical", "class_distance", "refer", "refer_reasons")


def iter_predictions(predictor: Predictor, paths: list[Path], *, batch_size: int = 32,
                     workers: int | None = None) -> Iterator[dict[str, Any]]:
    """Yield one row per path, in order: `path`, then the prediction (`label`, `probabilities`, `ood`,
    `ood_score`, `atypical`, `class_distance`, `refer`, `refer_reasons`), or `error`.

    Threads, not processes: nothing to start for one film, and no torch DataLoader to import. While
    the model scores one batch (ONNX Runtime and PyTorch release the GIL), the threads decode the next two."""
    workers = cpu_count() if workers is None else workers
    # Pillow decodes without the GIL, so threads decode in parallel.
    decoded = ordered_map(partial(_decode, size=predictor.size), paths, workers, ahead=2 * batch_size)
    for start in range(0, len(paths), batch_size):
        batch = [(path, *next(decoded)) for path in paths[start : start + batch_size]]
        good = [image for _, image, _ in batch if image is not None]
        scores = iter(predictor.score(np.stack(good)) if good else [])
        for path, image, error in batch:
            yield {"path": str(path), "error": error} if image is None else {"path": str(path), **predictor.result(next(scores))}


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
