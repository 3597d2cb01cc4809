"""Latency and throughput of `covid-xray serve` on loopback, with a generated 1024×1024 JPEG.

    PYTHONPATH=src python benchmarks/serve_latency.py [--bundle RUN/model] [--requests 200] [--clients 8]

Starts a real server process (default settings), then measures:
  - one client, one request at a time: p50/p95 latency and throughput;
  - `--clients` concurrent clients sending the same number of requests: throughput and latency;
  - `covid-xray predict` on one JPEG in a fresh process (wall time, process start included).
Without --bundle it builds a bundle of the default backbone with a random head (same cost).
"""

from __future__ import annotations

import argparse
import io
import os
import shlex
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from http.client import HTTPConnection
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

SRC = Path(__file__).resolve().parents[1] / "src"


def chest_like_jpeg(size: int = 1024, seed: int = 0) -> bytes:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    img = 40 + 60 * np.exp(-(((xx - 0.5) / 0.35) ** 2 + ((yy - 0.5) / 0.45) ** 2))
    for cx in (0.32, 0.68):
        img += 90 * (((xx - cx) / 0.14) ** 2 + ((yy - 0.5) / 0.3) ** 2 < 1)
    img += rng.normal(0, 8, img.shape)
    buf = io.BytesIO()
    Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def default_bundle(folder: Path) -> Path:
    import torch

    from covid_xray.bundle import save_bundle
    from covid_xray.models import DEFAULT_BACKBONE, create_model, input_size

    torch.manual_seed(0)
    model = create_model(DEFAULT_BACKBONE, 3, weights="imagenet").eval()
    config = {"backbone": DEFAULT_BACKBONE, "classes": ["Covid", "Normal", "Viral Pneumonia"],
              "input_size": input_size(DEFAULT_BACKBONE), "normalization": {"mean": list(model.mean), "std": list(model.std)}}
    return save_bundle(folder / "model", model, config)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(SRC), os.environ.get("PYTHONPATH")]))}


def start_server(bundle: Path, port: int, extra: list[str]) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-m", "covid_xray.cli", "serve", str(bundle), "--port", str(port),
                             "--log-level", "warning", *extra], env=env())
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            sys.exit(f"server exited with {proc.returncode}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/ping", timeout=2).status_code == 200:
                return proc
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    proc.kill()
    sys.exit("server did not become ready")


def run_clients(url: str, image: bytes, clients: int, total: int) -> tuple[float, list[float]]:
    """`total` requests split over `clients` threads, each with its own keep-alive connection."""
    latencies: list[float] = []
    lock = threading.Lock()
    counts = [total // clients + (c < total % clients) for c in range(clients)]
    barrier = threading.Barrier(clients + 1)

    host, port = url.removeprefix("http://").split(":")

    def client(n: int) -> None:
        # The standard library's client: a load generator on the same two cores as the server should
        # take as little CPU from it as possible (httpx costs several times more per request).
        mine = []
        http = HTTPConnection(host, int(port), timeout=60)
        barrier.wait()
        for _ in range(n):
            t = time.perf_counter()
            http.request("POST", "/invocations", body=image, headers={"Content-Type": "image/jpeg"})
            r = http.getresponse()
            body = r.read()
            mine.append(time.perf_counter() - t)
            if r.status != 200:
                raise RuntimeError(f"HTTP {r.status}: {body[:200]!r}")
        http.close()
        with lock:
            latencies.extend(mine)

    threads = [threading.Thread(target=client, args=(n,)) for n in counts]
    for t in threads:
        t.start()
    barrier.wait()
    start = time.perf_counter()
    for t in threads:
        t.join()
    return time.perf_counter() - start, latencies


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process (Linux): what a measurement cost, whatever else runs."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return float("nan")
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def pct(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) * 1000


def predict_wall(bundle: Path, image: Path, runs: int = 3) -> float:
    walls = []
    for _ in range(runs):
        t = time.perf_counter()
        subprocess.run([sys.executable, "-m", "covid_xray.cli", "predict", str(bundle), str(image)], env=env(),
                       check=True, capture_output=True)
        walls.append(time.perf_counter() - t)
    return statistics.median(walls)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", type=Path, help="model bundle (default: default backbone, random head)")
    parser.add_argument("--requests", type=int, default=200, help="requests per measurement")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--serve-args", default="", help="extra options for covid-xray serve, e.g. '--max-batch-size 4'")
    parser.add_argument("--skip-predict", action="store_true", help="do not time `covid-xray predict`")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        bundle = args.bundle or default_bundle(tmp)
        image = chest_like_jpeg()
        (tmp / "xray.jpg").write_bytes(image)
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        server = start_server(bundle, port, shlex.split(args.serve_args))
        try:
            run_clients(url, image, 1, 10)  # warm-up
            cpu0 = cpu_seconds(server.pid)
            seq_time, seq_lat = run_clients(url, image, 1, args.requests)
            cpu1 = cpu_seconds(server.pid)
            con_time, con_lat = run_clients(url, image, args.clients, args.requests)
            cpu2 = cpu_seconds(server.pid)
            stats = httpx.get(f"{url}/stats").json()["batcher"]
        finally:
            server.terminate()
            server.wait(30)
        startup = None if args.skip_predict else predict_wall(bundle, tmp / "xray.jpg")

    seq_rps, con_rps = args.requests / seq_time, args.requests / con_time
    print(f"covid-xray serve {args.serve_args}".rstrip() + f", 1024×1024 JPEG ({len(image) / 1024:.0f} KiB), {args.requests} requests, "
          f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}\n")
    seq_cpu, con_cpu = (cpu1 - cpu0) / args.requests * 1000, (cpu2 - cpu1) / args.requests * 1000
    print(f"| {'measurement':<26} | {'p50 ms':>7} | {'p95 ms':>7} | {'req/s':>7} | {'server CPU ms/req':>17} |")
    print(f"|{'-' * 28}|{'-' * 9}|{'-' * 9}|{'-' * 9}|{'-' * 19}|")
    print(f"| {'1 client, sequential':<26} | {pct(seq_lat, 50):7.1f} | {pct(seq_lat, 95):7.1f} | {seq_rps:7.1f} | {seq_cpu:17.1f} |")
    print(f"| {f'{args.clients} concurrent clients':<26} | {pct(con_lat, 50):7.1f} | {pct(con_lat, 95):7.1f} | {con_rps:7.1f} | {con_cpu:17.1f} |")
    print(f"\nthroughput {args.clients} clients / sequential: {con_rps / seq_rps:.2f}×")
    print(f"batches: {stats['batches']}, mean size {stats['mean_batch_size']}, sizes {stats['batch_size_histogram']}")
    if startup is not None:
        print(f"`covid-xray predict` one JPEG, fresh process: {startup:.2f} s wall (median of 3)")


if __name__ == "__main__":
    main()
