"""Small helpers that several stages need, written once: atomic file writes, paths shown relative to a
root, the CPUs this process may use, an ordered map over threads, boolean words, and whether ONNX is
installed. Imports nothing heavy."""

from __future__ import annotations

import importlib.util
import os
import threading
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO, TypeVar

T = TypeVar("T")
R = TypeVar("R")

TRUE_WORDS = ("true", "1", "yes")
FALSE_WORDS = ("false", "0", "no")
ONNX_MODULES = ("onnx", "onnxruntime", "onnxscript")


@contextmanager
def atomic_path(target: str | os.PathLike) -> Iterator[Path]:
    """A temporary path beside `target` to write to; on success it replaces `target` in one step, on
    failure it is removed. Readers (and other processes filling the same cache) never see a partial
    file under the real name. The name is unique per process and thread."""
    target = Path(target)
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}-{threading.get_ident()}")
    try:
        yield tmp
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write(target: str | os.PathLike, content: bytes | str | Callable[[BinaryIO], object]) -> Path:
    """Write bytes, text (UTF-8) or whatever `content(file)` writes to `target` atomically."""
    with atomic_path(target) as tmp, open(tmp, "wb") as f:
        if callable(content):
            content(f)
        else:
            f.write(content.encode() if isinstance(content, str) else content)
    return Path(target)


def relative_path(path: Path, root: Path) -> str:
    """`path` relative to `root` in POSIX form, or the whole path when it lies elsewhere."""
    try:
        return path.relative_to(root).as_posix()
    except ValueError:
        return str(path)


def cpu_count() -> int:
    """CPUs this process may run on (a container's or taskset's limit, not the host's core count)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def ordered_map(fn: Callable[[T], R], items: Iterable[T], workers: int, ahead: int) -> Iterator[R]:
    """`fn` of each item, in order, computed by `workers` threads at most `ahead` items beyond the one
    being consumed (bounded memory for any number of items); 0 workers: in the calling thread."""
    if not workers:
        yield from map(fn, items)
        return
    with ThreadPoolExecutor(max_workers=workers) as pool:
        pending: deque[Future] = deque()
        for item in items:
            pending.append(pool.submit(fn, item))
            if len(pending) > ahead:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


def parse_bool(value: str) -> bool | None:
    """true/1/yes → True, false/0/no → False (any case, spaces ignored), anything else → None."""
    word = value.strip().lower()
    return True if word in TRUE_WORDS else False if word in FALSE_WORDS else None


def onnx_available(modules: tuple[str, ...] = ONNX_MODULES) -> bool:
    """Whether the `onnx` extra is installed (exporting needs all three; running needs onnxruntime)."""
    return all(importlib.util.find_spec(m) is not None for m in modules)
