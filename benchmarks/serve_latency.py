"""Latency and throughput of `covid-xray serve` on loopback, with a generated 1024×1024 JPEG.

    PYTHONPATH=src python benchmarks/serve_latency.py [--bundle RUN/model] [--requests 200] [--clients 8]

Starts a real server process (default settings), then measures:
  - one client, one request at a time: p50/p95 latency and throughput;
  - `--clients` concurrent clients sending the same number of requests: throughput and latency.
With --compare-api-key it instead starts two servers, one requiring a (generated) API key, and sends one
request to each in turn (a keep-alive connection each), so the key's cost is measured against the same
drift of the machine. (`benchmarks/user_wait.py` times `covid-xray predict` in a fresh process.)
Without --bundle it builds a bundle of the default backbone at the default training size with a random
head, exported to ONNX like a trained bundle (same cost, without the OOD guard's small matrix product).
"""

from __future__ import annotations

import argparse
import os
import secrets
import shlex
import socket
import subprocess
import sys
import tempfile
import threading
import time
from http.client import HTTPConnection
from pathlib import Path

import httpx
import numpy as np
from _common import xray_jpeg

SRC = Path(__file__).resolve().parents[1] / "src"


def default_bundle(folder: Path) -> Path:
    """The default backbone at the default training size with a random head, exported to ONNX when the
    onnx extra is installed (as `covid-xray train` does), so the server runs what a trained bundle runs."""
    import torch

    from covid_xray.bundle import BundleConfig, save_bundle
    from covid_xray.config import TrainConfig
    from covid_xray.export import export_bundle
    from covid_xray.models import create_model
    from covid_xray.training import image_size
    from covid_xray.util import onnx_available

    torch.manual_seed(0)
    cfg = TrainConfig()
    model = create_model(cfg.backbone, 3, weights="imagenet").eval()
    config = BundleConfig(backbone=cfg.backbone, classes=["Covid", "Normal", "Viral Pneumonia"],
                          input_size=image_size(cfg), normalization=model.normalization())
    bundle = save_bundle(folder / "model", model, config)
    if onnx_available():
        export_bundle(bundle, log=lambda message: None)
    return bundle


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(SRC), os.environ.get("PYTHONPATH")]))}


def start_server(bundle: Path, port: int, extra: list[str], key: str | None = None) -> subprocess.Popen:
    keys = {"COVID_XRAY_API_KEYS": key} if key else {}
    proc = subprocess.Popen([sys.executable, "-m", "covid_xray.cli", "serve", str(bundle), "--port", str(port),
                             "--log-level", "warning", *extra], env={**env(), **keys})
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
        http.connect()
        # As curl and urllib3 do: without it, the body's last segment can wait for a delayed ACK (40 ms).
        http.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
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


def compare_api_key(bundle: Path, image: bytes, requests: int, extra: list[str]) -> None:
    """p50/p95 of one request at a time to a server without keys and to one with, in turns."""
    key = secrets.token_urlsafe(32)
    ports = {"without a key": free_port(), "with an API key": free_port()}
    servers = [start_server(bundle, ports["without a key"], extra), start_server(bundle, ports["with an API key"], extra, key)]
    headers = {"without a key": {"Content-Type": "image/jpeg"},
               "with an API key": {"Content-Type": "image/jpeg", "Authorization": f"Bearer {key}"}}
    try:
        connections = {name: HTTPConnection("127.0.0.1", port, timeout=60) for name, port in ports.items()}
        for http in connections.values():
            http.connect()
            http.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        latencies: dict[str, list[float]] = {name: [] for name in ports}
        for i in range(requests + 10):  # the first 10 of each warm up
            for name, http in connections.items():
                t = time.perf_counter()
                http.request("POST", "/invocations", body=image, headers=headers[name])
                r = http.getresponse()
                body = r.read()
                if r.status != 200:
                    raise RuntimeError(f"{name}: HTTP {r.status}: {body[:200]!r}")
                if i >= 10:
                    latencies[name].append(time.perf_counter() - t)
    finally:
        for server in servers:
            server.terminate()
            server.wait(30)
    print(f"1024×1024 JPEG, {requests} requests to each server in turns, {os.cpu_count()} CPUs\n")
    print("| server | p50 ms | p95 ms |\n| --- | ---: | ---: |")
    for name, values in latencies.items():
        print(f"| {name} | {pct(values, 50):.2f} | {pct(values, 95):.2f} |")
    difference = pct(latencies["with an API key"], 50) - pct(latencies["without a key"], 50)
    print(f"\np50 difference (with − without): {difference:+.2f} ms")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process and its children alive now (Linux; `--workers N` serves from
    child processes): what a measurement cost, whatever else runs."""
    total = 0.0
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        for task in Path(f"/proc/{pid}/task").iterdir():
            total += sum(cpu_seconds(int(child)) for child in (task / "children").read_text().split())
    except OSError:
        return total or float("nan")
    return total


def pct(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", type=Path, help="model bundle (default: default backbone, random head)")
    parser.add_argument("--requests", type=int, default=200, help="requests per measurement")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--serve-args", default="", help="extra options for covid-xray serve, e.g. '--max-batch-size 4'")
    parser.add_argument("--compare-api-key", action="store_true",
                        help="compare one-at-a-time latency with and without an API key (two servers, in turns)")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        bundle = args.bundle or default_bundle(tmp)
        image = xray_jpeg(1024, 1024, "L")
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        if args.compare_api_key:
            return compare_api_key(bundle, image, args.requests, shlex.split(args.serve_args))
        server = start_server(bundle, port, shlex.split(args.serve_args))
        try:
            run_clients(url, image, 1, 10)  # warm-up
            cpu0, client0 = cpu_seconds(server.pid), time.process_time()
            seq_time, seq_lat = run_clients(url, image, 1, args.requests)
            cpu1, client1 = cpu_seconds(server.pid), time.process_time()
            con_time, con_lat = run_clients(url, image, args.clients, args.requests)
            cpu2, client2 = cpu_seconds(server.pid), time.process_time()
            stats = httpx.get(f"{url}/stats").json()["batcher"]
        finally:
            server.terminate()
            server.wait(30)

    seq_rps, con_rps = args.requests / seq_time, args.requests / con_time
    print(f"covid-xray serve {args.serve_args}".rstrip() + f", 1024×1024 JPEG ({len(image) / 1024:.0f} KiB), {args.requests} requests, "
          f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}\n")
    per_request = lambda a, b: (b - a) / args.requests * 1000  # noqa: E731
    rows = [("1 client, sequential", seq_lat, seq_rps, per_request(cpu0, cpu1), per_request(client0, client1)),
            (f"{args.clients} concurrent clients", con_lat, con_rps, per_request(cpu1, cpu2), per_request(client1, client2))]
    print(f"| {'measurement':<26} | {'p50 ms':>7} | {'p95 ms':>7} | {'req/s':>7} | {'server CPU ms/req':>17} | {'client CPU ms/req':>17} |")
    print(f"|{'-' * 28}|{'-' * 9}|{'-' * 9}|{'-' * 9}|{'-' * 19}|{'-' * 19}|")
    for name, latencies, rps, server_cpu, client_cpu in rows:
        print(f"| {name:<26} | {pct(latencies, 50):7.1f} | {pct(latencies, 95):7.1f} | {rps:7.1f} | {server_cpu:17.1f} | {client_cpu:17.1f} |")
    print(f"\nthroughput {args.clients} clients / sequential: {con_rps / seq_rps:.2f}×")
    # Concurrency can at best keep every core busy: at the measured CPU cost per request (server and
    # this load generator, which share the cores), that caps the gain over one client at a time.
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    ceiling = cores / ((rows[1][3] + rows[1][4]) / 1000)
    print(f"ceiling on {cores} cores at that CPU cost per request: {ceiling:.0f} req/s = {ceiling / seq_rps:.2f}× sequential")
    print(f"batches: {stats['batches']}, mean size {stats['mean_batch_size']}, sizes {stats['batch_size_histogram']}")


if __name__ == "__main__":
    main()
