"""Helpers for the serving tests: hostile payloads, DICOM files, and a real `covid-xray serve` process."""

from __future__ import annotations

import io
import os
import socket
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import httpx
import numpy as np

SRC = Path(__file__).resolve().parents[1] / "src"


def png_bomb(width: int = 50_000, height: int = 50_000) -> bytes:
    """A PNG whose header claims width×height 8-bit pixels; a decoder that trusts it allocates GBs."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    idat = zlib.compress(b"\0" * (width + 1) * 64)  # the first rows; the rest would follow
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


# What a real film's header carries about the patient: none of it may ever leave the server.
PATIENT = {"PatientName": "Planted^Patientname", "PatientID": "PID-4711-PLANTED", "PatientBirthDate": "19450101",
           "AccessionNumber": "ACC-PLANTED-99"}


def dicom_bytes(pixels: np.ndarray | None = None, *, rows: int | None = None, columns: int | None = None,
                patient: dict[str, str] | None = None) -> bytes:
    """A minimal 16-bit MONOCHROME2 DICOM file; rows/columns override the header (for bombs); `patient`:
    header elements to set (e.g. PATIENT)."""
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

    if pixels is None:
        pixels = np.zeros((8, 8), np.uint16)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(None, {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Modality, ds.PhotometricInterpretation, ds.SamplesPerPixel = "CR", "MONOCHROME2", 1
    ds.Rows, ds.Columns = rows or pixels.shape[0], columns or pixels.shape[1]
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    ds.PixelData = pixels.astype(np.uint16).tobytes()
    for keyword, value in (patient or {}).items():
        setattr(ds, keyword, value)
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def wait_ready(client, timeout: float = 120) -> dict:
    """Poll GET /ping (TestClient or httpx.Client) until the model is loaded; fail on a load error."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        r = client.get("/ping")
        if r.status_code == 200:
            return r.json()
        assert r.json()["status"] == "loading", r.text
        time.sleep(0.05)
    raise TimeoutError(f"model did not load within {timeout} s")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServeProcess:
    """`covid-xray serve BUNDLE` on a free loopback port, as a user would start it."""

    def __init__(self, bundle: Path, *extra: str, env: dict[str, str] | None = None, scheme: str = "http",
                 verify=True):
        self.port = free_port()
        self.url = f"{scheme}://127.0.0.1:{self.port}"
        self.verify = verify  # for HTTPS: an ssl.SSLContext that trusts the server's certificate
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")]), **(env or {})}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "covid_xray.cli", "serve", str(bundle), "--port", str(self.port), *extra],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )

    def wait_ready(self, timeout: float = 120) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.proc.stdout.read()}")
            try:
                r = httpx.get(f"{self.url}/ping", timeout=2, verify=self.verify)
                if r.status_code == 200:
                    return r.json()
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        raise TimeoutError(f"server not ready after {timeout} s")

    def stop(self) -> str:
        """Stop it like Ctrl-C would, and return its log."""
        if self.proc.poll() is None:
            self.proc.send_signal(2)  # SIGINT
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.stdout.read()
