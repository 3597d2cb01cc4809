"""Finding a dataset — the Kaggle layout, class folders or a CSV manifest, one source or several — and
splitting it (stratified, seeded, each source on its own); the data fingerprint; augmentation and the
training tensors. Reading the images themselves is `images`'s job.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import io
import os
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

from .config import SPLIT_SEED, TEST_FRACTION, VAL_FRACTION
from .errors import DataError
from .known_labels import mislabelled
from .util import relative_path

if TYPE_CHECKING:  # images builds on this module's Sample
    from .images import CachedImages

DEFAULT_DATA_DIR = Path("data/Covid19-dataset")
DATA_ENV_VAR = "COVID_XRAY_DATA"
KAGGLE_DATASET = "pranavraikokte/covid19-image-dataset"
# Files that operating systems drop into folders; never X-rays.
JUNK_FILES = {"thumbs.db", "desktop.ini"}
SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class Sample:
    path: Path
    label: int
    source: str = ""  # the name of the data source (one --data) it came from


@dataclass(frozen=True)
class Source:
    """One `--data` entry: its name, where it is, and (once discovered) its layout and carved splits."""

    name: str
    path: Path
    layout: str = ""
    carved: tuple[str, ...] = ()


@dataclass
class Dataset:
    """Samples per split, class names in label order, and how the splits were made."""

    classes: list[str]
    splits: dict[str, list[Sample]]
    layout: str  # "kaggle", "folders" or "csv"; several sources' distinct layouts joined by "+"
    carved: list[str] = field(default_factory=list)  # splits this code carved out (vs. given)
    root: Path = Path(".")
    sources: list[Source] = field(default_factory=list)
    holdout: str | None = None  # a source used only for testing: all its images are in "test"
    dropped: list[Path] = field(default_factory=list)  # files known to be mislabelled, left out

    def __getitem__(self, split: str) -> list[Sample]:
        return self.splits[split]

    def counts(self) -> dict[str, dict[str, int]]:
        return {
            split: {c: sum(s.label == i for s in samples) for i, c in enumerate(self.classes)}
            for split, samples in self.splits.items()
        }

    def write_splits_csv(self, path: Path) -> None:
        """Record exactly which file went to which split, so a run can be audited and repeated."""
        with open(path, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["path", "label", "split", "source"])
            for split, samples in self.splits.items():
                for s in samples:
                    writer.writerow([relative_path(s.path, self.root), self.classes[s.label], split, s.source])


def resolve_data_dir(arg: str | os.PathLike | None, missing: str | None = None) -> Path:
    """--data, else $COVID_XRAY_DATA, else ./data/Covid19-dataset; say how to get it if absent (or, for
    a folder that is not the training data, what `missing` says)."""
    candidate = Path(arg or os.environ.get(DATA_ENV_VAR) or DEFAULT_DATA_DIR).expanduser()
    if candidate.exists():
        return candidate
    if missing:
        raise DataError(f"{candidate} not found: {missing}")
    # `download` installs at data/Covid19-dataset unless told where: name the folder only when it differs.
    dest = "" if candidate == DEFAULT_DATA_DIR else f" --dest {candidate}"
    raise DataError(
        f"dataset not found at {candidate}: pass --data DIR or set {DATA_ENV_VAR}; get the data from "
        f"Kaggle '{KAGGLE_DATASET}' (unzip so that DIR/train/<class>/ exists), or run "
        f"'covid-xray download{dest}' (pip install 'covid-xray[download]'; needs Kaggle credentials)"
    )


def parse_sources(data: str | os.PathLike | Sequence[str | os.PathLike] | None, missing: str | None = None) -> list[Source]:
    """`--data` values (one or several) as named sources. `NAME=PATH` names a source; otherwise its name
    is the folder's (or manifest's) name, made unique with -2, -3, … No value: the default dataset.
    `missing`: what to tell a user whose path does not exist (default: how to get the Kaggle data)."""
    values = [data] if isinstance(data, (str, os.PathLike)) else list(data or []) or [None]
    named: list[tuple[str | None, Path]] = []
    for value in values:
        name, sep, rest = str(value).partition("=") if value is not None else ("", "", "")
        explicit = bool(sep and name and rest and "/" not in name and not Path(str(value)).exists())
        named.append((name if explicit else None, resolve_data_dir(rest if explicit else value, missing)))
    taken = [name for name, _ in named if name]
    if len(set(taken)) < len(taken):
        raise DataError(f"source names must differ: {', '.join(taken)}")
    sources = []
    for name, path in named:
        if name is None:
            base = _default_name(path)
            name, n = base, 1
            while name in taken:
                n += 1
                name = f"{base}-{n}"
            taken.append(name)
        sources.append(Source(name, path))
    return sources


def _default_name(path: Path) -> str:
    return (path.stem if path.is_file() else path.resolve().name) or "data"


def discover(
    data: str | os.PathLike | Sequence[Source],
    *,
    val_fraction: float = VAL_FRACTION,
    test_fraction: float = TEST_FRACTION,
    split_seed: int = SPLIT_SEED,
    holdout: str | None = None,
    drop_mislabelled: bool = False,
) -> Dataset:
    """Find train/val/test samples in one dataset (a path) or several sources, each a Kaggle layout,
    a class-folder tree or a CSV manifest.

    Each source is split on its own: validation is always carved from its train (stratified, seeded);
    test only when it does not provide one. The splits of all sources are then concatenated. Class
    names are the sorted folder/label names of all sources. `holdout` names a source used for testing
    only: all its images go to "test", none to train or val. `drop_mislabelled` leaves out the files
    known to be mislabelled (`known_labels`) before any split is carved.
    """
    if isinstance(data, (str, os.PathLike)):
        sources = [Source(_default_name(Path(data)), Path(data))]
    else:
        sources = list(data)
    names = [s.name for s in sources]
    if holdout is not None and holdout not in names:
        raise DataError(f"unknown --holdout-source {holdout!r}: the sources are {', '.join(names)}")
    if holdout is not None and len(sources) == 1:
        raise DataError(f"--holdout-source {holdout!r} is the only source: pass another --data to train on")
    given = {s.name: given_splits(s.path, single=len(sources) == 1) for s in sources}
    classes = _check_classes(given, holdout)
    index = {c: i for i, c in enumerate(classes)}

    splits: dict[str, list[Sample]] = {s: [] for s in SPLITS}
    found, dropped = [], []
    for source in sources:
        layout, items = given[source.name]
        if drop_mislabelled:
            dropped += [p for s in SPLITS for p, _ in items.get(s, []) if mislabelled(p)]
            items = {s: [(p, label) for p, label in items.get(s, []) if p not in dropped] for s in SPLITS}
        mine = {s: [Sample(p, index[label], source.name) for p, label in items.get(s, [])] for s in SPLITS}
        carved: list[str] = []
        if source.name == holdout:  # the model never sees any of it: every image tests it
            mine = {"train": [], "val": [], "test": [x for s in SPLITS for x in mine[s]]}
        else:
            mine, carved = _carve(mine, val_fraction, test_fraction, split_seed)
        for split in SPLITS:
            splits[split] += mine[split]
        found.append(dataclasses.replace(source, layout=layout, carved=tuple(carved)))

    layout = "+".join(dict.fromkeys(s.layout for s in found))
    carved = [split for split in ("test", "val") if any(split in s.carved for s in found)]
    roots = [s.path.parent if s.layout == "csv" else s.path for s in found]
    root = roots[0] if len(roots) == 1 else Path(os.path.commonpath([r.resolve() for r in roots]))
    return Dataset(classes, splits, layout, carved, root, found, holdout, dropped)


def given_splits(root: Path, *, single: bool) -> tuple[str, dict[str, list[tuple[Path, str]]]]:
    """A source's layout and the (path, class name) items of the splits it provides."""
    if not root.exists():
        raise DataError(f"{root} does not exist")
    if root.is_file():
        if root.suffix.lower() != ".csv":
            raise DataError(f"{root} is a file but not a CSV manifest (path,label[,split])")
        given, layout = _read_manifest(root), "csv"
    elif class_dirs(root / "train"):
        given, layout = {"train": _scan_class_dirs(root / "train")}, "kaggle"
        if (root / "test").is_dir():
            given["test"] = _scan_class_dirs(root / "test")
    elif class_dirs(root):
        given, layout = {"train": _scan_class_dirs(root)}, "folders"
    else:
        raise DataError(
            f"{root} has no class folders: expected DIR/train/<class>/*.jpg (Kaggle layout), "
            f"DIR/<class>/*.jpg, or a CSV manifest with columns path,label[,split]"
        )
    classes = sorted({label for items in given.values() for _, label in items})
    # One source of several may hold one class (the audit then warns that source and class are confounded).
    if single and len(classes) < 2:
        raise DataError(f"{root} has only one class ({', '.join(classes)}); need at least two")
    train_classes = {label for _, label in given.get("train", [])}
    for split, items in given.items():
        found = {label for _, label in items}
        if split != "train" and found != train_classes:
            raise DataError(
                f"class sets differ between train ({', '.join(sorted(train_classes))}) and "
                f"{split} ({', '.join(sorted(found))}) in {root}"
            )
    return layout, given


def labelled_files(root: Path) -> list[tuple[Path, str]]:
    """Every (path, class name) a source holds, whatever split each is in: the films of a site a bundle
    was not trained on, for external evaluation."""
    _, given = given_splits(root, single=False)
    return [item for split in SPLITS for item in given.get(split, [])]


def _check_classes(given: dict[str, tuple[str, dict[str, list[tuple[Path, str]]]]], holdout: str | None) -> list[str]:
    """All sources' class names, sorted. Refuses a source whose class names differ from another
    source's only in spelling (case, spaces, underscores, hyphens: one class under two names), a
    held-out source with a class no training source has (the model could not learn it) and fewer
    than two classes to train on."""
    found = {name: sorted({label for items in g.values() for _, label in items}) for name, (_, g) in given.items()}
    spelled: dict[str, str] = {}  # spelling-insensitive key → the name the first source to use it gives
    for name, classes in found.items():
        for c in classes:
            other = spelled.get(_spelling(c), c)
            if other != c:
                raise DataError(f"source {name!r} has classes {', '.join(classes)}: {c!r} looks like {other!r} "
                                f"of another source; use the same class names in every source")
        for c in classes:
            spelled.setdefault(_spelling(c), c)
    trained = sorted({c for name, classes in found.items() if name != holdout for c in classes})
    if len(trained) < 2:
        raise DataError(f"the training sources have only one class ({', '.join(trained)}); need at least two")
    if holdout is not None and set(found[holdout]) - set(trained):
        raise DataError(f"held-out source {holdout!r} has classes {', '.join(found[holdout])}, but no training "
                        f"source has {', '.join(sorted(set(found[holdout]) - set(trained)))}")
    return sorted({c for classes in found.values() for c in classes})


def _spelling(name: str) -> str:
    return " ".join(name.replace("_", " ").replace("-", " ").lower().split())


def _carve(splits: dict[str, list[Sample]], val_fraction: float, test_fraction: float, seed: int):
    """Carve test from train when not given, then validation from train (stratified, seeded)."""
    carved = []
    if not splits["test"]:
        splits["train"], splits["test"] = _stratified_split(splits["train"], test_fraction, seed, "test")
        carved.append("test")
    if not splits["val"]:
        splits["train"], splits["val"] = _stratified_split(splits["train"], val_fraction, seed, "val")
        carved.append("val")
    return splits, carved


def class_dirs(folder: Path) -> list[Path]:
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def _is_candidate(path: Path) -> bool:
    return path.is_file() and not path.name.startswith(".") and path.name.lower() not in JUNK_FILES


def _scan_class_dirs(folder: Path) -> list[tuple[Path, str]]:
    items = []
    for class_dir in class_dirs(folder):
        files = sorted(p for p in class_dir.rglob("*") if _is_candidate(p))
        if not files:
            raise DataError(f"class folder {class_dir} has no images; remove it or add images")
        items += [(p, class_dir.name) for p in files]
    return items


def _read_manifest(path: Path) -> dict[str, list[tuple[Path, str]]]:
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        fields = [c.strip().lower() for c in reader.fieldnames or []]
        if "path" not in fields or "label" not in fields:
            raise DataError(f"{path}: manifest needs a header with columns path,label[,split]")
        rows = [{k.strip().lower(): (v or "").strip() for k, v in row.items() if k} for row in reader]
    given: dict[str, list[tuple[Path, str]]] = {}
    for line, row in enumerate(rows, start=2):
        split = row.get("split") or "train"
        if split not in SPLITS:
            raise DataError(f"{path}:{line}: split must be one of {', '.join(SPLITS)}, got {split!r}")
        if not row["path"] or not row["label"]:
            raise DataError(f"{path}:{line}: empty path or label")
        file = Path(row["path"]) if Path(row["path"]).is_absolute() else path.parent / row["path"]
        if not file.is_file():
            raise DataError(f"{path}:{line}: image file {file} does not exist")
        given.setdefault(split, []).append((file, row["label"]))
    if not given.get("train"):
        raise DataError(f"{path}: manifest has no training rows")
    return given


def _stratified_split(samples: list[Sample], fraction: float, seed: int, name: str):
    from sklearn.model_selection import train_test_split

    counts = Counter(s.label for s in samples)
    if min(counts.values()) < 2 or round(fraction * len(samples)) < len(counts):
        raise DataError(
            f"too few images to carve a stratified {name} split ({fraction:.0%} of {len(samples)}) with every "
            f"class in it; add images or provide the {name} split (images per class: {dict(sorted(counts.items()))})"
        )
    keep, held = train_test_split(
        samples, test_size=fraction, random_state=seed, stratify=[s.label for s in samples]
    )
    return sorted(keep, key=lambda s: str(s.path)), sorted(held, key=lambda s: str(s.path))


def fingerprint(digests_by_split: dict[str, list[str]], classes: list[str], samples_by_split) -> str:
    """One SHA-256 over the content, label and split (and source, when there are several) of every
    image used: identifies the data. One source's name is left out, so renaming its folder keeps it."""
    several = len({s.source for samples in samples_by_split.values() for s in samples}) > 1
    h = hashlib.sha256()
    for split in sorted(digests_by_split):
        for digest, sample in sorted(zip(digests_by_split[split], samples_by_split[split]), key=lambda t: t[0]):
            source = f"{sample.source}:" if several else ""
            h.update(f"{split}:{source}{classes[sample.label]}:{digest}\n".encode())
    return h.hexdigest()


# --- training input ----------------------------------------------------------------------------


class TextureJitter:
    """Half the time, resample a film through a random lower resolution (down to `low` of its size); half
    the time, JPEG-compress it at a random quality. Films reach a hospital's archive at every resolution
    and compression, and in public data both follow the source, hence the class (radiography-dev's Viral
    Pneumonia files are 256 px, its other classes 224 px): randomised, neither can stand in for the class."""

    def __init__(self, low: float = 0.4, p: float = 0.5, quality: tuple[int, int] = (30, 95)):
        self.low, self.p, self.quality = low, p, quality

    def __call__(self, x):
        import torch
        import torch.nn.functional as F

        if torch.rand(()) < self.p:
            factor = self.low + (1 - self.low) * float(torch.rand(()))
            h, w = x.shape[-2:]
            small = F.interpolate(x[None].float(), size=(max(8, round(h * factor)), max(8, round(w * factor))),
                                  mode="bilinear", antialias=True)
            x = F.interpolate(small, size=(h, w), mode="bilinear")[0].round().clamp(0, 255).to(torch.uint8)
        if torch.rand(()) < self.p:  # Pillow's encoder: torchvision's is deprecated
            buffer = io.BytesIO()
            quality = int(torch.randint(self.quality[0], self.quality[1] + 1, ()))
            Image.fromarray(x[0].numpy()).save(buffer, "JPEG", quality=quality)
            x = torch.from_numpy(np.array(Image.open(buffer)))[None]
        return x


def augmentation(size: int, texture_jitter: bool = False):
    """Anatomy-preserving augmentation for chest films: no flips (the heart is on the left).

    The zoom reaches out to 0.6× (the chest smaller in the frame, neck and arms showing) because
    framing is a shortcut in public data: on the Kaggle dataset, training Normal films are tightly
    framed while test Normal and all Viral Pneumonia films show a wider field; with mild zoom the model
    called a third of test Normal films Viral Pneumonia. `texture_jitter`: see TextureJitter."""
    from torchvision.transforms import v2

    return v2.Compose([
        v2.RandomResizedCrop(size, scale=(0.8, 1.0), ratio=(0.9, 1.1), antialias=True),
        v2.RandomAffine(degrees=7, translate=(0.06, 0.06), scale=(0.6, 1.0)),
        v2.ColorJitter(brightness=0.2, contrast=0.2),
        *([TextureJitter()] if texture_jitter else []),
    ])


class ImageTensors:
    """A torch-style dataset over decoded uint8 images: yields (1×H×W uint8 tensor, label)."""

    def __init__(self, images: CachedImages | np.ndarray, labels: list[int], transform=None):
        self.images = images
        self.labels = labels
        self.transform = transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        import torch

        x = torch.from_numpy(self.images[i]).unsqueeze(0)
        return (self.transform(x) if self.transform else x), self.labels[i]
