"""The endpoints `deploy` makes and later commands reach again: `covid-xray serve` on a loopback
port for local-process, a SageMaker endpoint (local mode or managed) deployed through either SDK line, and
a local-mode endpoint seen from another process. `Endpoint` is what every one of them offers."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

from ..access import KEYS_ENV
from ..errors import CovidXrayError
from . import entry
from .jobs import LOCAL_MODES, LOCAL_PROCESS, LocalContainers, _extract
from .local_process import free_port
from .sdk import IMAGE_CONTENT_TYPE, predictor

# Where SageMaker local mode serves an endpoint (the SDK's default local.serving_port).
LOCAL_MODE_URL = "http://localhost:8080"


class Endpoint(Protocol):
    """What every endpoint here offers, like the SDK's Predictor: `predict` answers with the
    endpoint's JSON (`predictions`, one per image, and `model`); `describe` is what `deploy`
    records, from which `endpoint_from_state` reaches the endpoint again in another process."""

    def predict(self, image: bytes) -> dict[str, Any]: ...

    def delete_endpoint(self) -> None: ...

    def describe(self) -> dict[str, Any]: ...


def _serve_env() -> dict[str, str]:
    """The emulated endpoint's environment: a SageMaker endpoint sits behind IAM and answers its
    clients without API keys, so keys meant for `covid-xray serve` are not passed on."""
    env = {k: v for k, v in os.environ.items() if k != KEYS_ENV}
    return {**env, "PYTHONPATH": entry.child_pythonpath()}


class LocalProcessEndpoint:
    """`covid-xray serve` on a loopback port, serving model.tar.gz unpacked as SageMaker would."""

    def __init__(self, url: str, pid: int, model_dir: str, proc: subprocess.Popen | None = None):
        self.url, self.pid, self.model_dir = url, pid, model_dir
        self._proc = proc  # set in the process that started the server

    @classmethod
    def start(cls, model_data: str | os.PathLike, workdir: str | os.PathLike, *, port: int | None = None,
              timeout_s: float = 180) -> LocalProcessEndpoint:
        workdir = Path(workdir).resolve()
        model_dir = _extract(Path(model_data), workdir / "model")
        port = port or free_port()
        with open(workdir / "serve.log", "wb") as log_file:  # the server keeps its own copy of the descriptor
            proc = subprocess.Popen(
                [sys.executable, "-m", "covid_xray.cli", "serve", str(model_dir),
                 "--host", "127.0.0.1", "--port", str(port)],
                stdout=log_file, stderr=subprocess.STDOUT, env=_serve_env(),
                start_new_session=True,  # outlives the `deploy` command; `cleanup` stops it
            )
        endpoint = cls(f"http://127.0.0.1:{port}", proc.pid, str(model_dir), proc)
        endpoint._wait_ready(timeout_s, workdir / "serve.log")
        return endpoint

    def _wait_ready(self, timeout_s: float, log_path: Path) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self._proc is not None and self._proc.poll() is not None:
                tail = log_path.read_text(errors="replace").strip().splitlines()[-5:]
                raise CovidXrayError(f"the endpoint exited while starting (status {self._proc.returncode}): " + " / ".join(tail))
            try:
                with urllib.request.urlopen(f"{self.url}/ping", timeout=2) as response:
                    if response.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.25)
        self.delete_endpoint()
        raise CovidXrayError(f"the endpoint did not answer /ping within {timeout_s:.0f} s; see {log_path}")

    def predict(self, image: bytes, content_type: str = IMAGE_CONTENT_TYPE) -> dict[str, Any]:
        return http_invoke(self.url, image, content_type)

    def delete_endpoint(self) -> None:
        """Stop the server (SIGTERM, then SIGKILL after 20 s); a no-op when it is already gone."""
        _stop(self.pid, self._running, ((signal.SIGTERM, 20), (signal.SIGKILL, 5)))

    def _running(self) -> bool:
        if self._proc is not None:  # our child: poll() also reaps it
            return self._proc.poll() is None
        return _alive_with(self.pid, self.model_dir)

    def describe(self) -> dict[str, Any]:
        return {"kind": LOCAL_PROCESS, "url": self.url, "pid": self.pid, "model_dir": self.model_dir}


def _alive_with(pid: int, *args: str) -> bool:
    """Whether pid is alive and was started with all of `args` (a server of this very model folder, the
    `sagemaker deploy` command), so that a recycled pid is never signalled. Without /proc (macOS), whether it is alive."""
    if Path("/proc/self").exists():
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
        except OSError:
            return False
        return all(arg in argv for arg in args)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def _stop(pid: int, running: Callable[[], bool], signals: Sequence[tuple[signal.Signals, float]]) -> bool:
    """Send each signal in turn while `running()`, waiting up to its grace seconds; whether the process stopped."""
    for sig, grace_s in signals:
        if not running():
            return True
        os.kill(pid, sig)
        deadline = time.monotonic() + grace_s
        while running() and time.monotonic() < deadline:
            time.sleep(0.1)
    return not running()


class SageMakerEndpoint:
    """A SageMaker (local mode or managed) endpoint, deployed through either SDK line (`sdk_v2.Deployed`,
    `sdk_v3.Deployed`, `sdk_v3.DeployedLocally`)."""

    def __init__(self, deployed, instance_type: str, sdk: str, containers: LocalContainers | None = None):
        self.deployed, self.instance_type, self.sdk, self.containers = deployed, instance_type, sdk, containers

    def predict(self, image: bytes) -> dict[str, Any]:
        return self.deployed.predict(image)

    def delete_endpoint(self) -> None:
        """The endpoint, its endpoint config and its model (local mode: and its containers)."""
        try:
            self.deployed.delete()
        finally:
            if self.containers:
                self.containers.remove()

    def describe(self) -> dict[str, Any]:
        described = {"kind": self.instance_type, "name": self.deployed.name, "region": self.deployed.region,
                     "sdk": self.sdk}
        return described | ({"url": LOCAL_MODE_URL} if self.instance_type in LOCAL_MODES else {})


def http_post(url: str, data: bytes, content_type: str = IMAGE_CONTENT_TYPE, timeout_s: float = 120) -> tuple[int, bytes]:
    """POST /invocations, as SageMaker's runtime does: (HTTP status, response body). An endpoint that
    does not answer at all is one sentence."""
    request = urllib.request.Request(f"{url}/invocations", data=data, method="POST",
                                     headers={"Content-Type": content_type, "Accept": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()
    except (urllib.error.URLError, OSError) as e:
        raise CovidXrayError(f"no endpoint answering at {url} ({getattr(e, 'reason', e)}): deploy it first") from None


def http_invoke(
    url: str, image: bytes, content_type: str = IMAGE_CONTENT_TYPE, timeout_s: float = 120
) -> dict[str, Any]:
    """The endpoint's JSON answer; an error response becomes one sentence."""
    status, body = http_post(url, image, content_type, timeout_s)
    if status == 200:
        return json.loads(body)
    detail = body.decode(errors="replace")
    try:
        detail = json.loads(detail).get("error", detail)
    except (json.JSONDecodeError, AttributeError):
        pass
    raise CovidXrayError(f"the endpoint refused the request ({status}): {detail}")


class LocalModeEndpoint:
    """A local-mode endpoint seen from another process: reachable over HTTP, but owned by the `sagemaker deploy`
    command that made it (`pid`), which deletes it and its containers when it is interrupted."""

    DEPLOY_ARGS = ("sagemaker", "deploy")

    def __init__(self, url: str = LOCAL_MODE_URL, kind: str = "local", pid: int | None = None):
        self.url, self.kind, self.pid = url, kind, pid

    def predict(self, image: bytes) -> dict[str, Any]:
        return http_invoke(self.url, image)

    def delete_endpoint(self) -> None:
        """Stop the deploy command (SIGTERM, which it handles as Ctrl-C); a no-op when it is already gone."""
        if self.pid is None:
            raise CovidXrayError("a local-mode endpoint lives as long as the process that deployed it: stop that one")
        if not _stop(self.pid, lambda: _alive_with(self.pid, *self.DEPLOY_ARGS), ((signal.SIGTERM, 120),)):
            raise CovidXrayError(f"the deploy command (pid {self.pid}) did not stop within 120 s: press Ctrl-C there")

    def describe(self) -> dict[str, Any]:
        # Only what endpoint_from_state reads back: the SDK's name for it belongs to its deploy process.
        return {"kind": self.kind, "url": self.url, "pid": self.pid}


def endpoint_from_state(described: Mapping[str, Any]) -> Endpoint:
    """The endpoint that `deploy` recorded (`describe()`), from another process."""
    kind = described["kind"]
    if kind == LOCAL_PROCESS:
        return LocalProcessEndpoint(described["url"], described["pid"], described["model_dir"])
    if kind in LOCAL_MODES:
        return LocalModeEndpoint(described["url"], kind, described.get("pid"))
    line = described.get("sdk")
    return SageMakerEndpoint(predictor(described["name"], kind, described.get("region"), line), kind, line)
