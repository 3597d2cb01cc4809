"""`covid-xray export` and the ONNX Runtime backends: parity with PyTorch, int8 agreement, checksums."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from _images import encode, make_class_tree, xray_like

from covid_xray.bundle import ONNX, ONNX_INT8
from covid_xray.errors import ModelError
from covid_xray.inference import BACKEND_ENV, Predictor

CLASSES = ("Covid", "Normal", "Viral Pneumonia")


def covid_xray(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "covid_xray.cli", *map(str, args)],
                          capture_output=True, text=True, timeout=600, check=False)


@pytest.fixture(scope="module")
def exported(untrained_bundle, tmp_path_factory) -> Path:
    """The untrained bundle with model.onnx and model.int8.onnx, made by the command a user runs
    (int8 calibrated on a small synthetic dataset with the bundle's classes)."""
    root = tmp_path_factory.mktemp("export")
    data = make_class_tree(root / "data", classes=CLASSES, per_class=8, size=96)
    bundle = shutil.copytree(untrained_bundle, root / "bundle")
    result = covid_xray("export", bundle, "--onnx", "--int8", "--data", data)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "bundle files: model.int8.onnx, model.onnx, model.safetensors" in result.stdout
    return bundle


@pytest.fixture(scope="module")
def images() -> np.ndarray:
    return np.stack([np.asarray(xray_like(224, seed=i)) for i in range(6)])


def test_export_records_checksums_and_how_int8_was_made(exported):
    config = json.loads((exported / "config.json").read_text())
    assert set(config["files"]) == {"model.safetensors", "ood.safetensors", ONNX, ONNX_INT8}
    assert all(len(digest) == 64 for digest in config["files"].values())
    int8 = config["onnx"]["int8"]
    assert int8["calibration_images"] > 0 and 0 < int8["fallback_margin"] <= 1
    assert not [p.name for p in exported.iterdir() if p.name.startswith(".")]  # no temporary files left


def test_onnx_probabilities_match_pytorch(exported, images):
    torch_probs = Predictor.from_bundle(exported, backend="torch").probabilities(images)
    onnx = Predictor.from_bundle(exported, backend="onnx")
    assert onnx.backend == "onnx"
    np.testing.assert_allclose(onnx.probabilities(images), torch_probs, atol=1e-4)
    assert onnx.probabilities(images[:1]).shape == (1, 3)  # dynamic batch: 1 and 6 from one graph
    assert onnx.probabilities(images[:0]).shape == (0, 3)


def test_int8_backend_is_close_to_fp32_and_rescores_near_ties_in_fp32(exported, images):
    int8 = Predictor.from_bundle(exported, backend="onnx-int8")
    fp32 = Predictor.from_bundle(exported, backend="onnx").probabilities(images)
    np.testing.assert_allclose(int8.probabilities(images), fp32, atol=0.1)
    int8.onnx.margin = 1.0  # every image is a near-tie now: all are re-scored by the fp32 graph
    np.testing.assert_array_equal(int8.probabilities(images), fp32)
    rows = int8.predict([encode(xray_like(500, seed=1))])
    assert rows[0]["label"] in CLASSES and np.isclose(sum(rows[0]["probabilities"].values()), 1, atol=1e-4)


def test_backend_choice(exported, untrained_bundle, monkeypatch):
    assert Predictor.from_bundle(exported).backend == "onnx"  # auto prefers the exported fp32 graph
    assert Predictor.from_bundle(untrained_bundle).backend == "torch"  # nothing exported
    monkeypatch.setenv(BACKEND_ENV, "onnx-int8")  # how serve and the SageMaker handlers choose
    assert Predictor.from_bundle(exported).backend == "onnx-int8"
    assert Predictor.from_bundle(exported, backend="torch").backend == "torch"
    with pytest.raises(ModelError, match="unknown backend 'tensorrt'"):
        Predictor.from_bundle(exported, backend="tensorrt")


def intra_op_threads(session) -> int:
    return session.get_session_options().intra_op_num_threads


def test_onnx_sessions_get_the_cores_the_server_gives_each_worker(exported):
    from covid_xray.server import ModelState, ServerSettings
    from covid_xray.util import cpu_count

    default = Predictor.from_bundle(exported, backend="onnx-int8")
    assert intra_op_threads(default.onnx.session) == intra_op_threads(default.onnx.fallback.session) == cpu_count()
    assert intra_op_threads(Predictor.from_bundle(exported, backend="onnx", threads=1).onnx.session) == 1
    # `serve --workers 2`: each process's model threads together use its share of the cores, not all of them.
    settings = ServerSettings().for_processes(2)
    state = ModelState()
    state.load(exported, settings)
    try:
        assert state.ready, state.error
        assert intra_op_threads(state.predictor.onnx.session) == settings.model_threads * settings.inference_threads
        assert settings.model_threads * settings.inference_threads <= max(1, cpu_count() // 2)
    finally:
        state.close()


def test_onnx_predictor_loads_torch_only_when_its_model_is_asked_for(exported):
    code = (
        "import sys; from covid_xray.inference import Predictor; import numpy as np; "
        f"p = Predictor.from_bundle({str(exported)!r}, backend='onnx'); "
        "p.probabilities(np.zeros((1, 224, 224), np.uint8)); assert 'torch' not in sys.modules; "
        "assert p.model.head.out_features == 3"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 0, result.stderr[-3000:]


@pytest.mark.parametrize("command", ["predict", "evaluate", "check-site"])
def test_commands_on_an_onnx_bundle_never_import_torch(exported, command):
    # `import torch` alone costs ~1.5-2 s of a fresh process's wall time; an ONNX bundle does not need it.
    data = exported.parent / "data"
    args = {"predict": [exported, data / "Covid" / "Covid_0.png", data / "Normal"],
            "evaluate": [exported, "--external", "--data", data, "--bootstrap", "20"],
            "check-site": [exported, data]}[command]
    script = ("import sys; from covid_xray.cli import main; rc = main(sys.argv[1:]); "
              "print('heavy:', sorted(m for m in ('torch', 'timm', 'torchvision') if m in sys.modules)); sys.exit(rc)")
    result = subprocess.run([sys.executable, "-c", script, command, *map(str, args)], capture_output=True, text=True,
                            timeout=300, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.splitlines()[-1] == "heavy: []"


@pytest.mark.parametrize(
    "args, message",
    [
        (["predict", "{plain}", "{image}", "--backend", "onnx"], "has no model.onnx; run 'covid-xray export {plain} --onnx' first"),
        (["predict", "{plain}", "{image}", "--backend", "onnx-int8"], "run 'covid-xray export {plain} --onnx --int8'"),
        (["predict", "{plain}", "{image}", "--backend", "gpu"], "unknown backend 'gpu'"),
        (["export", "{plain}"], "nothing to export: pass --onnx"),
        (["export", "{plain}", "--onnx", "--int8", "--data", "/nonexistent/data"], "dataset not found at /nonexistent/data"),
    ],
)
def test_backend_and_export_errors_are_one_line(args, message, untrained_bundle, tmp_path):
    image = tmp_path / "x.jpg"
    image.write_bytes(encode(xray_like(200)))
    plain = shutil.copytree(untrained_bundle, tmp_path / "plain")
    fill = {"{plain}": str(plain), "{image}": str(image)}
    result = covid_xray(*[fill.get(a, a) for a in args])
    assert result.returncode == 2 and "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("covid-xray: error")]
    assert len(errors) == 1 and message.replace("{plain}", str(plain)) in errors[0]


def test_tampered_or_unrecorded_onnx_is_refused(exported, tmp_path):
    bundle = shutil.copytree(exported, tmp_path / "b")
    graph = bundle / ONNX
    data = bytearray(graph.read_bytes())
    data[len(data) // 2] ^= 0xFF
    graph.write_bytes(bytes(data))
    with pytest.raises(ModelError, match="model.onnx does not match the checksum"):
        Predictor.from_bundle(bundle, backend="onnx")
    with pytest.raises(ModelError, match="model.onnx does not match the checksum"):
        Predictor.from_bundle(bundle, backend="onnx-int8")  # its fp32 fallback is checked too

    config = json.loads((bundle / "config.json").read_text())
    del config["files"][ONNX]
    (bundle / "config.json").write_text(json.dumps(config))
    assert Predictor.from_bundle(bundle).backend == "torch"  # auto trusts only recorded graphs
    with pytest.raises(ModelError, match="has no model.onnx"):
        Predictor.from_bundle(bundle, backend="onnx")


# --- the real model on the real test images (CI sets COVID_XRAY_DATA) -------------------------------


@pytest.fixture(scope="module")
def trained_exported(trained_run, dataset_dir, tmp_path_factory) -> Path:
    from covid_xray.export import export_bundle

    bundle = shutil.copytree(trained_run.run_dir / "model", tmp_path_factory.mktemp("trained") / "model")
    export_bundle(bundle, int8=True, data=dataset_dir, log=lambda m: None)
    return bundle


@pytest.fixture(scope="module")
def test_split(trained_exported, dataset_dir):
    from covid_xray.data import discover
    from covid_xray.images import decode_samples

    config = json.loads((trained_exported / "config.json").read_text())
    decoded = decode_samples(discover(dataset_dir)["test"], config["input_size"])
    return decoded.images[:], np.array([s.label for s in decoded.samples])


@pytest.mark.slow
def test_fp32_onnx_matches_pytorch_on_the_test_images(trained_exported, test_split):
    images, _ = test_split
    onnx = Predictor.from_bundle(trained_exported, backend="onnx")
    torch_backend = Predictor.from_bundle(trained_exported, backend="torch")
    assert len(images) == 66
    np.testing.assert_allclose(onnx.probabilities(images), torch_backend.probabilities(images), atol=1e-4)
    # The OOD guard reads the graph's feature output: same scores as from PyTorch's features.
    np.testing.assert_allclose([s.ood_score for s in onnx.score(images)],
                               [s.ood_score for s in torch_backend.score(images)], atol=1e-4)


@pytest.mark.slow
def test_int8_agrees_with_fp32_on_the_test_images(trained_exported, test_split, record_property):
    images, labels = test_split
    fp32 = Predictor.from_bundle(trained_exported, backend="onnx").probabilities(images).argmax(1)
    int8_predictor = Predictor.from_bundle(trained_exported, backend="onnx-int8")
    int8 = int8_predictor.probabilities(images).argmax(1)
    pure = int8_predictor.onnx.session.run(None, {"image": images[:, None]})[0].argmax(1)  # without the fallback
    report = {
        "agreement": float((int8 == fp32).mean()), "accuracy": float((int8 == labels).mean()),
        "fp32_accuracy": float((fp32 == labels).mean()),
        "pure_int8_agreement": float((pure == fp32).mean()), "pure_int8_accuracy": float((pure == labels).mean()),
    }
    record_property("int8", report)
    print(f"int8 on the test split: {report}")
    assert report["agreement"] >= 0.99, report
