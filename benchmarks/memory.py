"""Peak memory and throughput of the training input pipeline at 1k, 10k and 50k images.

    python benchmarks/memory.py [--sizes 1000 10000 50000] [--root /tmp/covid-xray-memory]

For each size, a synthetic class-folder dataset is generated once (256×256 JPEGs), then a fresh
process runs the real pipeline: discover → decode into the disk cache → one epoch of the training
DataLoader (cache reads + augmentation) → a few training steps of the default model. Reported:
images/s of each stage and the process's peak resident memory. Memory should not grow with N.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

CLASSES = ("Covid", "Normal", "Viral Pneumonia")


def generate(root: Path, n: int) -> Path:
    folder = root / f"n{n}"
    done = folder / ".complete"
    if done.exists():
        return folder
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:256, 0:256] / 256
    base = 60 + 120 * np.exp(-(((xx - 0.5) / 0.35) ** 2 + ((yy - 0.5) / 0.45) ** 2))
    for i in range(n):
        c = CLASSES[i % len(CLASSES)]
        (folder / c).mkdir(parents=True, exist_ok=True)
        img = base + rng.normal(0, 12, base.shape) + 20 * (i % len(CLASSES))
        Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(folder / c / f"{i:06d}.jpg", quality=85)
    done.touch()
    return folder


def measure(data: str, cache: str, steps: int) -> dict:
    """Runs in a fresh process so that ru_maxrss is this size's peak alone."""
    import torch

    from covid_xray import data as data_mod
    from covid_xray.images import decode_samples
    from covid_xray.models import create_model
    from covid_xray.training import train_mode

    result = {}
    t = time.perf_counter()
    ds = data_mod.discover(data)
    train = decode_samples(ds["train"], 224, cache_dir=Path(cache))
    result["decode_img_s"] = len(train.samples) / (time.perf_counter() - t)

    labels = [s.label for s in train.samples]
    dataset = data_mod.ImageTensors(train.images, labels, data_mod.augmentation(224))
    loader = torch.utils.data.DataLoader(dataset, batch_size=32, shuffle=True)  # as in training.fit
    t = time.perf_counter()
    for _ in loader:
        pass
    result["loader_img_s"] = len(labels) / (time.perf_counter() - t)

    model = create_model("tf_efficientnet_lite0", len(ds.classes)).to(memory_format=torch.channels_last)
    optimizer = torch.optim.AdamW(model.parameters(), 1e-4)
    train_mode(model)
    batches = iter(loader)
    t = time.perf_counter()
    for _ in range(steps):
        x, y = next(batches)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = torch.nn.functional.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    result["train_img_s"] = steps * 32 / (time.perf_counter() - t)
    result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 10000, 50000])
    parser.add_argument("--root", default="/tmp/covid-xray-memory")
    parser.add_argument("--steps", type=int, default=5, help="training steps measured per size")
    parser.add_argument("--measure", nargs=2, metavar=("DATA", "CACHE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        print(json.dumps(measure(*args.measure, args.steps)))
        return

    root = Path(args.root)
    rows = []
    for n in args.sizes:
        data = generate(root, n)
        out = subprocess.run(
            [sys.executable, __file__, "--measure", str(data), str(root / f"cache{n}"), "--steps", str(args.steps)],
            capture_output=True, text=True, check=True,
        )
        rows.append((n, json.loads(out.stdout.strip().splitlines()[-1])))
    base = rows[0][1]["peak_rss_mb"]
    print("| images | decode+cache img/s | loader img/s | train img/s | peak RSS MB | × smallest |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: |")
    for n, r in rows:
        print(f"| {n:,} | {r['decode_img_s']:.0f} | {r['loader_img_s']:.0f} | {r['train_img_s']:.1f} | "
              f"{r['peak_rss_mb']:.0f} | {r['peak_rss_mb'] / base:.2f} |")


if __name__ == "__main__":
    main()
