"""A real two-process gloo run under torchrun on CPU."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from _images import make_class_tree

pytestmark = pytest.mark.integration


def test_two_process_run_writes_one_bundle_with_whole_split_metrics(tmp_path):
    data = make_class_tree(tmp_path / "data", per_class=12, size=72)
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "covid_xray.cli", "train", "--data", str(data), "--out", str(out), "--nproc", "2",
           "--weights", "none", "--image-size", "64", "--batch-size", "8", "--epochs", "2"]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("report: ") == 1  # only rank 0 writes and reports
    config = json.loads((out / "model/config.json").read_text())
    assert config["training"]["processes"] == 2
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["test"]["n"] == config["data"]["counts"]["test"]
    assert metrics["val"]["n"] == config["data"]["counts"]["val"]
    assert not list(tmp_path.rglob("*.tmp*"))  # no half-written files left behind
