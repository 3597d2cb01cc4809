"""Time-to-accuracy: `covid-xray train` against the usual notebook, on the same data, in one run.

    python benchmarks/train_vs_naive.py [--data DIR] [--naive-epochs 10] [--threads N]

The naive pipeline is written below the way a typical transfer-learning notebook does it: torchvision
`ImageFolder` decoding every full-size image every epoch, Resize + ToTensor + Normalize, the same
backbone with the same ImageNet weights (the backbone's own normalisation), BatchNorm in standard train
mode, Adam, cross-entropy, eager fp32. Its target is its own final test accuracy; its time is the
training time until the first epoch that reached it (test evaluations are not timed — both choices
favour the baseline). `covid-xray train` runs as a user runs it (a subprocess with default settings)
and its time is the whole command's wall time, data decoding, evaluation, plots and report included.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import machine, print_table, use_cores


def covid_xray_train(data: Path, out: Path) -> tuple[float, float]:
    """(wall seconds, test accuracy) of `covid-xray train` with its default settings."""
    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", "covid_xray.cli", "train", "--data", str(data), "--out", str(out)],
                   check=True, stdout=subprocess.DEVNULL, env={**os.environ, "TQDM_DISABLE": "1"})
    wall = time.perf_counter() - started
    return wall, json.loads((out / "metrics.json").read_text())["test"]["accuracy"]


def naive_training(data: Path, epochs: int, log) -> list[tuple[float, float]]:
    """The notebook way. Returns (training seconds so far, test accuracy) after every epoch."""
    import torch
    from torch import nn
    from torchvision import datasets, transforms

    from covid_xray.models import DEFAULT_BACKBONE, create_model

    torch.manual_seed(0)
    # The same timm backbone and offline ImageNet weights covid-xray starts from, used directly on RGB.
    net = create_model(DEFAULT_BACKBONE, 3, weights="imagenet").backbone
    cfg = net.pretrained_cfg
    size = cfg["input_size"][-1]
    transform = transforms.Compose([
        transforms.Resize((size, size)), transforms.ToTensor(), transforms.Normalize(cfg["mean"], cfg["std"]),
    ])
    train_loader = torch.utils.data.DataLoader(datasets.ImageFolder(data / "train", transform), batch_size=32, shuffle=True)
    test_loader = torch.utils.data.DataLoader(datasets.ImageFolder(data / "test", transform), batch_size=32)
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-4)
    criterion = nn.CrossEntropyLoss()

    history, elapsed = [], 0.0
    for epoch in range(1, epochs + 1):
        started = time.perf_counter()
        net.train()
        for x, y in train_loader:
            optimizer.zero_grad()
            loss = criterion(net(x), y)
            loss.backward()
            optimizer.step()
        elapsed += time.perf_counter() - started
        net.eval()
        with torch.no_grad():
            correct = sum(int((net(x).argmax(1) == y).sum()) for x, y in test_loader)
        history.append((elapsed, correct / len(test_loader.dataset)))
        log(f"naive epoch {epoch}: {elapsed:.0f} s, test accuracy {history[-1][1]:.4f}")
    return history


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default=os.environ.get("COVID_XRAY_DATA"), help="Kaggle layout (train/, test/); default $COVID_XRAY_DATA")
    parser.add_argument("--naive-epochs", type=int, default=10, help="the notebook's epoch count")
    parser.add_argument("--threads", type=int, help="cores to use (default: all usable)")
    args = parser.parse_args()
    if not args.data:
        parser.error("pass --data DIR or set COVID_XRAY_DATA")
    use_cores(args.threads)
    data = Path(args.data)
    log = lambda m: print(m, file=sys.stderr, flush=True)  # noqa: E731
    log(machine())

    with tempfile.TemporaryDirectory() as tmp:
        ours_wall, ours_acc = covid_xray_train(data, Path(tmp) / "run")
    log(f"covid-xray train: {ours_wall:.0f} s, test accuracy {ours_acc:.4f}")
    history = naive_training(data, args.naive_epochs, log)

    target = history[-1][1]
    naive_time = next(t for t, acc in history if acc >= target)
    reached = ours_acc >= target
    print(f"\nTarget: the naive pipeline's final test accuracy, {target:.4f}; {machine()}\n")
    print_table([
        {"pipeline": f"naive notebook ({args.naive_epochs} epochs, fp32, ImageFolder)", "test accuracy": f"{target:.4f}",
         "time to target s": f"{naive_time:.0f}"},
        {"pipeline": "covid-xray train (defaults, whole command)", "test accuracy": f"{ours_acc:.4f}",
         "time to target s": f"{ours_wall:.0f}" if reached else "not reached"},
    ])
    if reached:
        print(f"\ncovid-xray train reaches the target {naive_time / ours_wall:.1f}× faster (wall)")
    print("naive test accuracy per epoch: " + ", ".join(f"{acc:.3f}" for _, acc in history))


if __name__ == "__main__":
    main()
