"""Batch transform: every file under an input folder (or S3 prefix) sent through the job's model, one
`FILE.out` written per input, as SageMaker's batch transform writes them: the endpoint's response body,
under the input's path relative to the input folder, with `.out` appended.

`ml.*` and local mode run SageMaker's own transform job through the SDK (`sdk_v2` / `sdk_v3`, `build_transformer`).
`local-process` emulates it: the model served as the container serves it (`covid-xray serve` on a loopback
port, model.tar.gz unpacked), each file POSTed to /invocations with its content type by a bounded number
of threads, a `FILE.error` (status and reason) instead of a crash for a file the model refuses, and a
rerun that keeps the outputs already written and sends only the rest.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import CovidXrayError
from ..util import atomic_write, ordered_map
from .endpoints import LocalProcessEndpoint, http_post
from .jobs import Log

OUT, ERROR = ".out", ".error"
CONTENT_TYPES = {".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".png": "image/png", ".dcm": "application/dicom",
                 ".dicom": "application/dicom"}
DEFAULT_CONCURRENCY = 4  # SageMaker's MaxConcurrentTransforms: requests in flight at once


def content_type(path: Path) -> str:
    """By suffix; anything else goes as application/x-image, whose format the endpoint sniffs."""
    return CONTENT_TYPES.get(path.suffix.lower(), "application/x-image")


@dataclass
class TransformResult:
    output: str
    written: list[str] = field(default_factory=list)  # inputs (relative paths) answered in this run
    kept: list[str] = field(default_factory=list)  # inputs whose .out an earlier run wrote
    errors: dict[str, str] = field(default_factory=dict)  # input → why the endpoint refused it

    def summary(self) -> str:
        line = (f"transform: {len(self.written)} written, {len(self.kept)} kept from an earlier run, "
                f"{len(self.errors)} refused → {self.output}")
        return line + "".join(f"\n  {name}: {why} ({name}{ERROR})" for name, why in self.errors.items())


def answered_by_job(output: Path) -> list[str]:
    """The inputs (relative paths) a SageMaker transform job answered into the local folder `output`."""
    return sorted(str(p.relative_to(output)).removesuffix(OUT) for p in output.rglob("*" + OUT))


def input_files(root: Path) -> list[Path]:
    """Every file under `root` (or `root` itself), in order, as a transform job reads every object
    under its S3 prefix; hidden files (.DS_Store and the like) are left out."""
    if root.is_file():
        return [root]
    if not root.is_dir():
        raise CovidXrayError(f"transform input {root} is not a file or folder")
    files = sorted(p for p in root.rglob("*") if p.is_file() and not any(part.startswith(".")
                                                                       for part in p.relative_to(root).parts))
    if not files:
        raise CovidXrayError(f"transform input {root} has no files")
    return files


def run_local_process(model_data: str | os.PathLike, source: str | os.PathLike, output: str | os.PathLike, *,
                      workdir: str | os.PathLike, concurrency: int = DEFAULT_CONCURRENCY,
                      log: Log = print) -> TransformResult:
    """Emulate a transform job on this machine (see the module docstring)."""
    for where in (source, output):
        if str(where).startswith("s3://"):
            raise CovidXrayError(f"local-process transforms local folders, not {where}: use --instance-type ml.* "
                                 "for S3, or copy the files here")
    if concurrency < 1:
        raise CovidXrayError("--concurrency must be at least 1")
    source, output = Path(source).resolve(), Path(output).resolve()
    root = source.parent if source.is_file() else source
    files = input_files(source)
    names = {f: f.relative_to(root).as_posix() for f in files}
    result = TransformResult(str(output))
    answered = {f for f in files if (output / (names[f] + OUT)).is_file()}
    result.kept = [names[f] for f in files if f in answered]
    todo = [f for f in files if f not in answered]
    if not todo:
        return result
    log(f"transform: {len(todo)} files to send ({len(result.kept)} already answered), {concurrency} at a time")
    endpoint = LocalProcessEndpoint.start(model_data, workdir)
    try:
        for f, (status, body) in zip(todo, _invoke_all(endpoint.url, todo, concurrency)):
            out = output / (names[f] + OUT)
            out.parent.mkdir(parents=True, exist_ok=True)
            if status == 200:
                atomic_write(out, body)  # never a half-written .out: a rerun trusts every one it finds
                out.with_name(out.name.removesuffix(OUT) + ERROR).unlink(missing_ok=True)
                result.written.append(names[f])
            else:
                reason = _reason(body)
                atomic_write(out.with_name(out.name.removesuffix(OUT) + ERROR),
                             json.dumps({"status": status, "error": reason}) + "\n")
                result.errors[names[f]] = reason
    finally:
        endpoint.delete_endpoint()
    return result


def _invoke_all(url: str, files: list[Path], concurrency: int) -> Iterator[tuple[int, bytes]]:
    """(status, body) for each file, in order, with at most `concurrency` requests in flight."""
    def one(path: Path) -> tuple[int, bytes]:
        try:
            data = path.read_bytes()
        except OSError as e:
            return 0, json.dumps({"error": f"cannot read the file ({e.strerror or e})"}).encode()
        return http_post(url, data, content_type(path))

    return ordered_map(one, files, concurrency, ahead=concurrency)


def _reason(body: bytes) -> str:
    try:
        return str(json.loads(body)["error"])
    except (ValueError, KeyError, TypeError):
        return body.decode(errors="replace").strip()[:300] or "no answer"
