"""Time-to-accuracy: `covid-xray train` against the usual notebook, on the same data, in one run.

    python benchmarks/train_vs_naive.py [--data DIR] [--naive-epochs 10] [--threads N]

The naive pipeline is written below the way a typical transfer-learning notebook does it: torchvision
`ImageFolder` decoding every full-size image every epoch, Resize + ToTensor + Normalize, the same
backbone with the same ImageNet weights (the backbone's own normalisation), BatchNorm in standard train
mode, Adam, cross-entropy, eager fp32.

The target is the naive pipeline's final test accuracy. Time-to-accuracy, for both, is the wall time
until the first epoch whose model reaches it; scoring the test split is not timed. `covid-xray train`
runs as a user runs it (a subprocess with default settings: process start, data decoding and the head
warm-up count) and is paused while each epoch's checkpoint is scored; the naive loop runs inside this
process (its imports already paid, in its favour). Whole-run times are printed too.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from _common import machine, print_table, use_cores


def covid_xray_train(data: Path, out: Path, test: tuple[np.ndarray, np.ndarray]) -> tuple[list[tuple[float, float]], float, float]:
    """Run `covid-xray train` with its defaults as a user does, and score the model in every epoch's
    checkpoint on the test split while the process is paused (SIGSTOP), so scoring costs it no time.
    Returns ([(seconds so far, test accuracy)] per epoch, whole wall seconds, final test accuracy)."""
    proc = subprocess.Popen([sys.executable, "-m", "covid_xray.cli", "train", "--data", str(data), "--out", str(out)],
                            stdout=subprocess.DEVNULL, env={**os.environ, "TQDM_DISABLE": "1"})
    checkpoint, started, paused, seen, history = out / "checkpoint.pt", time.perf_counter(), 0.0, None, []
    while proc.poll() is None:
        time.sleep(0.05)
        try:
            stamp = checkpoint.stat().st_mtime_ns  # replaced atomically once per epoch
        except FileNotFoundError:
            continue
        if stamp == seen:
            continue
        proc.send_signal(signal.SIGSTOP)
        stopped = time.perf_counter()
        seen = stamp
        history.append((stopped - started - paused, checkpoint_accuracy(checkpoint, *test)))
        paused += time.perf_counter() - stopped
        proc.send_signal(signal.SIGCONT)
    if proc.returncode:
        raise SystemExit(f"covid-xray train failed with status {proc.returncode}")
    wall = time.perf_counter() - started - paused
    return history, wall, json.loads((out / "metrics.json").read_text())["test"]["accuracy"]


def checkpoint_accuracy(checkpoint: Path, images: np.ndarray, labels: np.ndarray) -> float:
    import torch

    from covid_xray.models import DEFAULT_BACKBONE, create_model, predict_probs

    model = create_model(DEFAULT_BACKBONE, int(labels.max()) + 1, weights="none")
    model.load_state_dict(torch.load(checkpoint, map_location="cpu", weights_only=True)["model"])
    return float((predict_probs(model, images).argmax(1) == labels).mean())


def test_split(data: Path) -> tuple[np.ndarray, np.ndarray]:
    """The test images exactly as covid-xray reads them (for scoring its checkpoints)."""
    from covid_xray.data import discover
    from covid_xray.images import decode_samples
    from covid_xray.models import DEFAULT_BACKBONE, input_size

    decoded = decode_samples(discover(data)["test"], input_size(DEFAULT_BACKBONE))
    return decoded.images[:], np.array([s.label for s in decoded.samples])


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
    def log(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    log(machine())

    with tempfile.TemporaryDirectory() as tmp:
        ours, ours_wall, ours_final = covid_xray_train(data, Path(tmp) / "run", test_split(data))
    log(f"covid-xray train: {ours_wall:.0f} s, final test accuracy {ours_final:.4f}")
    naive = naive_training(data, args.naive_epochs, log)

    target = naive[-1][1]
    naive_time = first_time(naive, target)
    # The selected (best-validation) model at the end counts too: it is what the bundle holds.
    ours_time = first_time(ours + [(ours_wall, ours_final)], target)
    print(f"\nTarget: the naive pipeline's final test accuracy, {target:.4f}. {machine()}\n")
    print_table([
        {"pipeline": f"naive notebook ({args.naive_epochs} epochs)", "final test accuracy": f"{target:.4f}",
         "time to target s": f"{naive_time:.0f}", "whole run s": f"{naive[-1][0]:.0f}"},
        {"pipeline": "covid-xray train (defaults)", "final test accuracy": f"{ours_final:.4f}",
         "time to target s": f"{ours_time:.0f}" if ours_time is not None else "not reached", "whole run s": f"{ours_wall:.0f}"},
    ])
    if ours_time is not None:
        print(f"\ncovid-xray train reaches the target {naive_time / ours_time:.1f}× faster (wall); "
              f"its whole run takes {naive_time / ours_wall:.1f}× less than the naive pipeline's time to the target")
    for name, history in (("naive", naive), ("covid-xray", ours)):
        print(f"{name} per epoch (s, test accuracy): " + ", ".join(f"({t:.0f}, {acc:.3f})" for t, acc in history))


def first_time(history: list[tuple[float, float]], target: float) -> float | None:
    return next((t for t, acc in history if acc >= target), None)


if __name__ == "__main__":
    main()
