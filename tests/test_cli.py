"""The command line as a user runs it: subprocesses, exit codes, files written, one-line errors."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from _images import make_class_tree, xray_like

TINY = ["--weights", "none", "--image-size", "64", "--batch-size", "8"]


def covid_xray(*args, check=True, **kw) -> subprocess.CompletedProcess:
    result = subprocess.run(
        [sys.executable, "-m", "covid_xray.cli", *map(str, args)], capture_output=True, text=True, timeout=600, **kw
    )
    if check:
        assert result.returncode == 0, result.stderr[-3000:]
    return result


def test_train_options_default_to_train_config_and_can_turn_each_setting_off():
    from covid_xray.cli import build_parser
    from covid_xray.config import TrainConfig, train_config

    assert train_config(build_parser().parse_args(["train"])) == TrainConfig()
    off = train_config(build_parser().parse_args(["train", "--no-fp32-depthwise", "--freeze-stride", "0", "--no-amp"]))
    assert (off.fp32_depthwise, off.freeze_stride, off.amp) == (False, 0, False)


def test_train_and_the_sagemaker_entry_point_take_every_setting_from_one_definition():
    import dataclasses

    from covid_xray.cli import build_parser
    from covid_xray.config import TrainConfig, setting_types, train_config
    from covid_xray.sagemaker.entry import SageMakerEnv
    from covid_xray.sagemaker.entry import build_parser as entry_parser

    changed = {int: 3, float: 0.5, str: "x"}
    for f in dataclasses.fields(TrainConfig):
        kind, default = setting_types()[f.name], getattr(TrainConfig(), f.name)
        value = (not default) if kind is bool else changed[kind]
        flag = "--" + f.name.replace("_", "-")
        cli_args = [flag if value else f"--no-{flag[2:]}"] if kind is bool else [flag, str(value)]
        want = TrainConfig(**{f.name: value})
        assert train_config(build_parser().parse_args(["train", *cli_args])) == want, f.name
        for spelling in {flag, f"--{f.name}"}:  # SDK users write hyperparameter names either way
            args = entry_parser(SageMakerEnv.from_environ({})).parse_args([spelling, str(value)])
            assert train_config(args) == want, spelling
        assert f.metadata["help"], f"{f.name} has no help text"


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory) -> Path:
    return make_class_tree(tmp_path_factory.mktemp("tiny") / "data", per_class=12, size=72)


@pytest.fixture(scope="module")
def tiny_run(tiny_data, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("runs") / "run"
    result = covid_xray("train", "--data", tiny_data, "--out", out, "--epochs", "2", *TINY)
    assert f"report: {out / 'report.md'}" in result.stdout
    assert "test_accuracy=" in result.stdout  # name=value lines for log scrapers
    return out


@pytest.mark.integration
def test_train_writes_bundle_metrics_report_and_plots(tiny_run):
    for name in ["model/model.safetensors", "model/model.onnx", "model/config.json", "model/ood.safetensors",
                 "model/MODEL_CARD.md", "metrics.json", "report.md", "splits.csv", "confusion_test.png", "roc_test.png",
                 "learning_curves.png", "reliability_test.png"]:
        assert (tiny_run / name).is_file(), name
    assert not (tiny_run / "checkpoint.pt").exists()
    metrics = json.loads((tiny_run / "metrics.json").read_text())
    test = metrics["test"]
    assert set(test) >= {"accuracy", "n", "per_class", "macro_auc", "ci95"}
    assert set(test["per_class"]["A"]) == {"sensitivity", "specificity", "precision", "f1", "auc"}
    config = json.loads((tiny_run / "model/config.json").read_text())
    assert config["classes"] == ["A", "B", "C"] and config["input_size"] == 64
    assert config["data"]["carved_splits"] == ["test", "val"] and len(config["data"]["fingerprint"]) == 64
    assert "test split was used for nothing but this evaluation" in (tiny_run / "report.md").read_text()


@pytest.mark.integration
def test_train_times_fit_and_post_fit_apart_and_evaluates_on_the_exported_graph(tiny_run):
    timing = json.loads((tiny_run / "metrics.json").read_text())["timing"]
    assert set(timing) == {"setup_seconds", "fit_seconds", "post_fit_seconds", "post_fit_backend"}
    assert timing["post_fit_backend"] == "onnx" and timing["fit_seconds"] > 0 and timing["post_fit_seconds"] > 0
    report = (tiny_run / "report.md").read_text()
    assert f"fit {timing['fit_seconds']} s, after the fit" in report and "on ONNX Runtime" in report


@pytest.mark.integration
def test_training_fits_calibration_ood_guard_and_referral_and_writes_a_model_card(tiny_run):
    metrics = json.loads((tiny_run / "metrics.json").read_text())
    config = json.loads((tiny_run / "model/config.json").read_text())
    temperature = metrics["calibration"]["temperature"]
    assert temperature == config["calibration"]["temperature"] and 0.25 <= temperature <= 8
    assert set(metrics["calibration"]["ece"]["test"]) == {"before", "after"}
    assert config["ood"]["threshold"] > 0 and config["ood"]["training_images"] == config["data"]["counts"]["train"]
    assert metrics["ood"]["flagged_rate"]["val"] == 0.0  # the threshold sits above every validation score
    assert metrics["ood"]["synthetic_outliers_flagged"] > 0.5  # noise, blanks, documents: even a 2-epoch model
    assert config["referral"]["threshold"] >= 0.95
    card = (tiny_run / "model/MODEL_CARD.md").read_text()
    for section in ("## Intended use", "not a diagnosis", "## Performance on the held-out test split", "## Calibration",
                    "## Out-of-distribution guard", "## Referral rule", "## Shortcut probes", "## Known limitations"):
        assert section in card, section
    assert f"T = {temperature:.3f}" in card and "## Calibration" in (tiny_run / "report.md").read_text()


@pytest.mark.integration
def test_predict_json_and_table(tiny_run, tmp_path):
    image = tmp_path / "x.png"
    xray_like(120).save(image)
    rows = json.loads(covid_xray("predict", tiny_run / "model", image, "--json").stdout)
    assert rows[0]["path"] == str(image) and rows[0]["label"] in ("A", "B", "C")
    assert list(rows[0]["probabilities"]) == ["A", "B", "C"]
    table = covid_xray("predict", tiny_run / "model", image).stdout
    assert str(image) in table and rows[0]["label"] in table


@pytest.mark.integration
def test_evaluate_reproduces_the_test_metrics(tiny_run, tiny_data):
    metrics = json.loads(covid_xray("evaluate", tiny_run / "model", "--data", tiny_data, "--json", "--bootstrap", "50").stdout)
    saved = json.loads((tiny_run / "metrics.json").read_text())["test"]
    assert metrics["test"]["accuracy"] == saved["accuracy"] and metrics["test"]["n"] == saved["n"]


@pytest.mark.parametrize(
    "args, message",
    [
        (["train", "--data", "/nonexistent/dir"], "dataset not found at /nonexistent/dir"),
        (["train", "--data", "{data}", "--backbone", "resnet_18"], "unknown backbone 'resnet_18'"),
        (["predict", "/nonexistent/bundle", "x.jpg"], "is not a model bundle"),
        (["train", "--data", "{data}", "--weights", "/nonexistent.pth"], "does not exist"),
    ],
)
def test_user_errors_are_one_line_without_traceback(args, message, tiny_data, tmp_path):
    args = [a.replace("{data}", str(tiny_data)) for a in args]
    extra = ["--out", str(tmp_path / "o")] if args[0] == "train" else []
    result = covid_xray(*args, *extra, check=False)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("covid-xray: error")]
    assert len(lines) == 1 and message in lines[0]


@pytest.mark.integration
def test_predict_marks_unreadable_files_and_exits_nonzero(tiny_run, tmp_path):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not a png")
    result = covid_xray("predict", tiny_run / "model", bad, "--json", check=False)
    assert result.returncode == 1
    assert "not an image" in json.loads(result.stdout)[0]["error"]


@pytest.mark.integration
def test_killed_run_resumes_to_the_same_result(tiny_data, tmp_path):
    """kill -9 after the first checkpoint, --resume, and end where an uninterrupted run ends."""
    args = ["train", "--data", tiny_data, *TINY, "--epochs", "4", "--patience", "10"]
    covid_xray(*args, "--out", tmp_path / "straight")

    out = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "covid_xray.cli", *map(str, args), "--out", str(out)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not (out / "checkpoint.pt").exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert (out / "checkpoint.pt").exists() and not (out / "model").exists()
    result = covid_xray(*args, "--out", out, "--resume")
    assert "resuming after epoch" in result.stdout
    straight = json.loads((tmp_path / "straight/metrics.json").read_text())
    resumed = json.loads((out / "metrics.json").read_text())
    assert resumed.pop("timing")["post_fit_seconds"] > 0 and straight.pop("timing")  # wall times differ, run to run
    assert resumed == straight
