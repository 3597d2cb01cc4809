"""`covid-xray download`: laying out a (generated) kagglehub download, and every failure a user can cause
as one line. Nothing here reaches the network: the subprocesses get a proxy on a closed local port."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from _images import make_class_tree

from covid_xray.data import discover, resolve_data_dir
from covid_xray.download import download, fetch, find_dataset_root, install_layout
from covid_xray.errors import CovidXrayError, DataError

CLASSES = ("Covid", "Normal", "Viral Pneumonia")
CLOSED_PORT = "http://127.0.0.1:9"  # discard port, nothing listens: any request fails at once, locally


def fake_download(root: Path, *, test_classes=CLASSES) -> Path:
    """What kagglehub leaves in its cache: the dataset nested in a versioned folder."""
    version = root / "datasets" / "pranavraikokte" / "covid19-image-dataset" / "versions" / "3"
    make_class_tree(version / "Covid19-dataset" / "train", CLASSES, per_class=8, size=32)
    make_class_tree(version / "Covid19-dataset" / "test", test_classes, per_class=3, size=32, seed=7)
    return version


def offline_env(tmp_path: Path) -> dict[str, str]:
    """Fake credentials, an empty cache and home, and every request sent to a closed local port."""
    env = {k: v for k, v in os.environ.items() if k.lower() not in {"no_proxy", "kaggle_api_token", "kaggle_config_dir"}}
    for name in ("HTTPS_PROXY", "HTTP_PROXY", "https_proxy", "http_proxy", "ALL_PROXY", "all_proxy"):
        env[name] = CLOSED_PORT
    (tmp_path / "home").mkdir(exist_ok=True)
    return {**env, "KAGGLEHUB_CACHE": str(tmp_path / "cache"), "KAGGLE_USERNAME": "nobody", "KAGGLE_KEY": "0" * 32,
            "HOME": str(tmp_path / "home")}


def one_error_line(stderr: str) -> str:
    assert "Traceback" not in stderr, stderr
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("covid-xray: error: "), stderr
    return lines[0]


def test_layout_finds_the_nested_dataset_and_training_accepts_it(tmp_path):
    downloaded = fake_download(tmp_path / "cache")
    dest = tmp_path / "data" / "Covid19-dataset"
    assert install_layout(downloaded, dest) == dest
    for split, n in (("train", 8), ("test", 3)):
        assert sorted(p.name for p in (dest / split).iterdir()) == list(CLASSES)
        assert all(len(list((dest / split / c).iterdir())) == n for c in CLASSES)
    assert os.listdir(dest.parent) == ["Covid19-dataset"]  # no temporary folder left beside it
    dataset = discover(dest)
    assert (dataset.layout, dataset.classes, dataset.carved) == ("kaggle", list(CLASSES), ["val"])
    assert len(dataset["test"]) == 9
    # Done already: a second run changes nothing, and `download` does not even ask kagglehub.
    assert install_layout(downloaded, dest) == dest
    said = []
    assert download(dest, log=said.append) == dest
    assert "already holds the dataset" in said[0]


def test_download_command_installs_what_kagglehub_returns_and_prints_the_data_option(tmp_path, monkeypatch, capsys):
    kagglehub = pytest.importorskip("kagglehub")
    from covid_xray.cli import main

    downloaded = fake_download(tmp_path / "cache")
    monkeypatch.setattr(kagglehub, "dataset_download", lambda handle, *a, **kw: str(downloaded))
    dest = tmp_path / "data" / "Covid19-dataset"
    assert main(["download", "--dest", str(dest)]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == f"next: covid-xray train --data {dest}"
    assert discover(dest).layout == "kaggle"


def test_layout_accepts_a_download_that_is_the_dataset_itself(tmp_path):
    downloaded = fake_download(tmp_path / "cache") / "Covid19-dataset"
    assert find_dataset_root(downloaded) == downloaded
    (tmp_path / "empty").mkdir()  # an empty folder made beforehand is no obstacle
    assert discover(install_layout(downloaded, tmp_path / "empty")).layout == "kaggle"


def test_a_download_without_train_and_test_is_refused_and_nothing_is_written(tmp_path):
    flat = make_class_tree(tmp_path / "cache" / "versions" / "1", CLASSES, per_class=2, size=32)
    dest = tmp_path / "data" / "Covid19-dataset"
    with pytest.raises(DataError, match=r"no folder with train/<class>/ and test/<class>/.*by hand"):
        install_layout(flat, dest)
    assert not dest.parent.exists()


def test_a_bad_download_leaves_no_half_written_dest(tmp_path):
    downloaded = fake_download(tmp_path / "cache", test_classes=CLASSES[:2])  # test lacks a class
    dest = tmp_path / "data" / "Covid19-dataset"
    with pytest.raises(DataError, match="class sets differ"):
        install_layout(downloaded, dest)
    assert os.listdir(dest.parent) == []


def test_an_existing_folder_with_other_files_is_refused(tmp_path):
    dest = tmp_path / "mine"
    dest.mkdir()
    (dest / "notes.txt").write_text("keep me")
    with pytest.raises(CovidXrayError, match="exists and is not empty, but is not the dataset"):
        install_layout(fake_download(tmp_path / "cache"), dest)
    assert os.listdir(dest) == ["notes.txt"]


def test_dataset_not_found_says_how_to_download_it_there(tmp_path):
    with pytest.raises(DataError, match=f"covid-xray download --dest {tmp_path / 'nope'}"):
        resolve_data_dir(tmp_path / "nope")


def test_offline_download_fails_with_one_line_saying_what_to_do(tmp_path):
    pytest.importorskip("kagglehub")
    dest = tmp_path / "data" / "Covid19-dataset"
    result = subprocess.run(
        [sys.executable, "-m", "covid_xray.cli", "download", "--dest", str(dest)],
        capture_output=True, text=True, timeout=120, env=offline_env(tmp_path),
    )
    assert result.returncode == 2, result.stderr
    line = one_error_line(result.stderr)
    assert "cannot reach Kaggle" in line and "retry when online" in line
    assert "https://www.kaggle.com/datasets/pranavraikokte/covid19-image-dataset by hand" in line
    assert f"{dest}/train and {dest}/test exist" in line
    assert not dest.parent.exists()


def test_download_without_kagglehub_says_how_to_install_it(tmp_path):
    dest = tmp_path / "data" / "Covid19-dataset"
    script = ("import sys; sys.modules['kagglehub'] = None; from covid_xray.cli import main; "
              f"sys.exit(main(['download', '--dest', {str(dest)!r}]))")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                            env=offline_env(tmp_path))
    assert result.returncode == 2, result.stderr
    assert "pip install 'covid-xray[download]'" in one_error_line(result.stderr)
    assert not dest.parent.exists()


def test_refused_credentials_say_where_credentials_go(tmp_path, monkeypatch):
    kagglehub = pytest.importorskip("kagglehub")
    import requests
    from kagglehub.exceptions import KaggleApiHTTPError

    def refuse(handle, *args, **kwargs):
        response = requests.Response()
        response.status_code = 401
        raise KaggleApiHTTPError("401 Client Error", response=response)

    monkeypatch.setattr(kagglehub, "dataset_download", refuse)
    with pytest.raises(CovidXrayError, match=r"HTTP 401: missing or invalid credentials.*kaggle.json.*KAGGLE_KEY"):
        fetch(tmp_path / "dest")


def test_an_unreadable_kaggle_json_is_named(tmp_path, monkeypatch):
    pytest.importorskip("kagglehub")
    for name, value in offline_env(tmp_path).items():
        monkeypatch.setenv(name, value)
    for name in ("KAGGLE_USERNAME", "KAGGLE_KEY"):
        monkeypatch.delenv(name)
    (tmp_path / "config").mkdir()
    (tmp_path / "config" / "kaggle.json").write_text("{not json")
    monkeypatch.setenv("KAGGLE_CONFIG_DIR", str(tmp_path / "config"))  # kagglehub reads it before any request
    with pytest.raises(CovidXrayError, match=r"Invalid Kaggle credentials file at .*kaggle.json.*KAGGLE_USERNAME"):
        fetch(tmp_path / "dest")
