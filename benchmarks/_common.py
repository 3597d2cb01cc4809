"""Shared by the benchmark scripts: timing statistics, the machine they ran on, a plain-text table."""

from __future__ import annotations

import io
import os
import platform
import time
from collections.abc import Callable, Sequence

import numpy as np
from PIL import Image


def time_calls(fn: Callable[[], object], *, min_calls: int = 20, min_seconds: float = 2.0, warmup: int = 3) -> np.ndarray:
    """Seconds per call: at least `min_calls` calls and `min_seconds` of them, after `warmup` untimed ones
    (first calls allocate and, for ONNX Runtime, finish planning)."""
    for _ in range(warmup):
        fn()
    times: list[float] = []
    started = time.perf_counter()
    while len(times) < min_calls or time.perf_counter() - started < min_seconds:
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return np.array(times)


def time_in_turns(fns: dict[str, Callable[[], object]], *, rounds: int, warmup: int = 2) -> dict[str, np.ndarray]:
    """Seconds per call of each function, calling them in turns, one call each per round, so a machine whose
    speed drifts during the benchmark affects them all alike; after `warmup` untimed calls of each."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            t = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t)
    return {name: np.array(t) for name, t in times.items()}


def latency_row(name: str, seconds: np.ndarray, batch: int, **extra: str) -> dict[str, str]:
    return {
        "what": name, "batch": str(batch), "images/s": f"{batch / seconds.mean():.1f}",
        "p50 ms": f"{np.percentile(seconds, 50) * 1e3:.1f}", "p95 ms": f"{np.percentile(seconds, 95) * 1e3:.1f}",
        **extra,
    }


def machine() -> str:
    """What the numbers depend on; the load average tells a reader whether other work competed for the cores."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg()) if hasattr(os, "getloadavg") else "n/a"
    return f"{platform.processor() or platform.machine()}, {cores} cores usable, load average {load}"


def print_table(rows: Sequence[dict[str, str]]) -> None:
    """A Markdown table (pastes straight into the README)."""
    headers = list(dict.fromkeys(k for row in rows for k in row))
    widths = {h: max(len(h), *(len(row.get(h, "")) for row in rows)) for h in headers}
    print("| " + " | ".join(h.ljust(widths[h]) for h in headers) + " |")
    print("| " + " | ".join("-" * widths[h] for h in headers) + " |")
    for row in rows:
        print("| " + " | ".join(row.get(h, "").ljust(widths[h]) for h in headers) + " |")


def use_cores(n: int | None) -> None:
    """Run as if the machine had n cores (CPU affinity, which PyTorch and ONNX Runtime both size their
    thread pools from). Call before torch is imported."""
    if n:
        os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[:n])


def xray_jpeg(width: int, height: int, mode: str, seed: int = 0) -> bytes:
    """A chest-film-like JPEG: bright lung fields on a dark background and film grain."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:256, 0:256] / 256
    small = 40 + 60 * np.exp(-(((xx - 0.5) / 0.35) ** 2 + ((yy - 0.5) / 0.45) ** 2))
    for cx in (0.32, 0.68):
        small += 90 * ((((xx - cx) / 0.14) ** 2 + ((yy - 0.5) / 0.3) ** 2) < 1)
    film = np.asarray(Image.fromarray(small.astype(np.float32)).resize((width, height), Image.Resampling.BILINEAR))
    # σ=2 grain gives ~0.8 bits per pixel, like the Kaggle images (0.6–1.1); smooth full-size
    # exports compress better, which would only make draft decoding look better still.
    grain = rng.normal(0, 2, (height, width)).astype(np.float32)
    img = Image.fromarray(np.clip(film + grain, 0, 255).astype(np.uint8)).convert(mode)
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=90)
    return buf.getvalue()
