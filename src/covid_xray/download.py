"""`covid-xray download`: fetch the Kaggle dataset with kagglehub and lay it out where training looks.

Two steps: `fetch` (kagglehub, into its own cache; every failure a user can cause becomes one
`CovidXrayError` line) and `install_layout` (find DIR/train and DIR/test in whatever tree came down and
put them at DEST, all at once or not at all). Imported only by the `download` command.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from .data import DEFAULT_DATA_DIR, KAGGLE_DATASET, class_dirs, given_splits
from .errors import CovidXrayError, DataError

KAGGLE_URL = f"https://www.kaggle.com/datasets/{KAGGLE_DATASET}"
CREDENTIALS_HINT = (
    "put your API token in ~/.kaggle/kaggle.json or set KAGGLE_USERNAME and KAGGLE_KEY "
    "(or KAGGLE_API_TOKEN); create one at https://www.kaggle.com/settings"
)
# The dataset sits a few folders down (versions/N/Covid19-dataset/...); deeper than this is not it.
MAX_DEPTH = 4


def by_hand(dest: Path) -> str:
    """The way that always works: what to tell a user when the automatic download cannot."""
    return f"download the zip from {KAGGLE_URL} by hand and unzip it so that {dest}/train and {dest}/test exist"


def download(dest: str | os.PathLike = DEFAULT_DATA_DIR, log: Callable[[str], object] = print) -> Path:
    """Fetch the dataset and install it at `dest`; returns `dest`. Nothing is fetched when `dest`
    already holds the dataset, and a `dest` holding anything else is refused before downloading."""
    dest = Path(dest)
    if _check_dest(dest):
        log(f"{dest} already holds the dataset (train/ and test/ class folders); nothing to download")
        return dest
    downloaded = fetch(dest, log=log)
    install_layout(downloaded, dest)
    log(f"dataset ready at {dest}")
    return dest


def fetch(dest: Path, handle: str = KAGGLE_DATASET, log: Callable[[str], object] = lambda m: None) -> Path:
    """kagglehub.dataset_download(handle): the folder in kagglehub's cache ($KAGGLEHUB_CACHE, default
    ~/.cache/kagglehub) it downloaded and unpacked. `dest` only shapes the error messages."""
    try:
        import kagglehub
    except ImportError:
        raise CovidXrayError(
            f"'covid-xray download' needs kagglehub, which is not installed: pip install 'covid-xray[download]', "
            f"or {by_hand(dest)}"
        ) from None
    # kagglehub talks HTTP through requests (its dependency): network and HTTP errors arrive as requests'.
    import requests
    from kagglehub import exceptions as kh

    log(f"downloading Kaggle dataset {handle} with kagglehub {getattr(kagglehub, '__version__', '')} ...")
    # Present in kagglehub 0.3 and 1.x; looked up by name so that a release dropping one still works.
    unauthenticated = tuple(getattr(kh, n) for n in ("UnauthenticatedError", "CredentialError") if hasattr(kh, n))
    corrupted = tuple(getattr(kh, n) for n in ("DataCorruptionError",) if hasattr(kh, n))
    try:
        return Path(kagglehub.dataset_download(handle))
    except (requests.ConnectionError, requests.Timeout) as e:  # no network, DNS, proxy, firewall, timeouts
        raise CovidXrayError(
            f"cannot reach Kaggle to download {handle} ({type(e).__name__}): retry when online, or {by_hand(dest)}"
        ) from None
    except requests.HTTPError as e:  # kagglehub's KaggleApiHTTPError is one
        status = getattr(e.response, "status_code", None)
        if status in (401, 403):
            raise CovidXrayError(
                f"Kaggle refused the download of {handle} (HTTP {status}: missing or invalid credentials): "
                f"{CREDENTIALS_HINT}; or {by_hand(dest)}"
            ) from None
        raise CovidXrayError(
            f"Kaggle answered HTTP {status} for {handle}: retry later, or {by_hand(dest)}"
        ) from None
    except unauthenticated as e:
        raise CovidXrayError(f"Kaggle credentials are missing or invalid ({e}): {CREDENTIALS_HINT}") from None
    except corrupted as e:
        raise CovidXrayError(f"the download of {handle} arrived corrupted ({e}): run 'covid-xray download' again") from None
    except ValueError as e:
        # kagglehub.config raises a plain ValueError for a kaggle.json it cannot read; other ValueErrors are bugs.
        if "credentials" not in str(e).lower():
            raise
        raise CovidXrayError(f"{e}: {CREDENTIALS_HINT}") from None
    except OSError as e:  # after the requests errors, which are OSErrors too: the cache cannot be written
        raise CovidXrayError(
            f"kagglehub could not write its cache ({e}): free disk space or set KAGGLEHUB_CACHE to a writable folder"
        ) from None


def install_layout(downloaded: str | os.PathLike, dest: str | os.PathLike) -> Path:
    """Put the dataset found in `downloaded` (the folder with train/<class>/ and test/<class>/, however
    deep) at `dest` as dest/train and dest/test, hard-linking files where the file system allows (no
    second copy on disk) and copying otherwise. Built in a temporary sibling and renamed into place, so
    `dest` is either absent or complete. Returns `dest`."""
    downloaded, dest = Path(downloaded), Path(dest)
    if _check_dest(dest):
        return dest
    root = find_dataset_root(downloaded)
    if root is None:
        raise DataError(
            f"the download at {downloaded} has no folder with train/<class>/ and test/<class>/ "
            f"(looked {MAX_DEPTH} levels deep); {by_hand(dest)}"
        )
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".partial", dir=dest.parent))
    try:
        for split in ("train", "test"):
            shutil.copytree(root / split, tmp / split, copy_function=_link_or_copy)
        given_splits(tmp, single=True)  # what training will check (empty class folders, class sets differ)
        if dest.exists():  # an empty folder (checked above): a rename cannot replace it everywhere
            dest.rmdir()
        tmp.rename(dest)
    except OSError as e:
        raise CovidXrayError(f"cannot write the dataset to {dest}: {e}") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # gone after the rename; left over only on failure
    return dest


def find_dataset_root(tree: Path) -> Path | None:
    """The shallowest folder at most MAX_DEPTH below `tree` holding train/<class>/ and test/<class>/
    (the first in name order when several are equally shallow), or None."""
    level = [tree] if tree.is_dir() else []
    for _ in range(MAX_DEPTH + 1):
        for folder in level:
            if class_dirs(folder / "train") and class_dirs(folder / "test"):
                return folder
        level = [sub for folder in level for sub in class_dirs(folder)]
    return None


def _check_dest(dest: Path) -> bool:
    """True when `dest` already holds a usable Kaggle-layout dataset, False when it is absent or an
    empty folder; refuses anything else rather than mixing a download into someone's files."""
    if not dest.exists():
        return False
    if not dest.is_dir():
        raise CovidXrayError(f"{dest} exists and is not a folder: pass another --dest")
    if not any(dest.iterdir()):
        return False
    problem = "it holds other files"
    if class_dirs(dest / "train") and class_dirs(dest / "test"):
        try:
            given_splits(dest, single=True)
            return True
        except DataError as e:
            problem = str(e)
    raise CovidXrayError(
        f"{dest} exists and is not empty, but is not the dataset ({problem}): pass another --dest, "
        f"or empty or remove {dest}"
    )


def _link_or_copy(src: str, dst: str) -> str:
    try:
        os.link(src, dst)
    except OSError:  # another file system, or one without hard links
        shutil.copy2(src, dst)
    return dst
