"""The inference protocol, in one place: request body + content type → images, results → response.

The HTTP server (`server`) and the SageMaker handlers (`sagemaker.handlers`) are thin shells over
these functions, so both accept exactly the same requests, refuse bad ones with the same status
and message, and answer with the same JSON.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
from typing import TYPE_CHECKING, Any

import numpy as np

from .errors import CovidXrayError, ImageError

if TYPE_CHECKING:
    from .inference import Predictor, Scores

JSON = "application/json"
IMAGE_TYPES = ("image/jpeg", "image/png", "application/x-image", "application/dicom")
CONTENT_TYPES = (*IMAGE_TYPES, JSON)
DEFAULT_MAX_BODY_BYTES = 20 * 1024 * 1024
DEFAULT_MAX_INSTANCES = 32
JSON_SHAPE = '{"instances": [{"b64": "<base64 image>"}, ...]}'


class RequestError(CovidXrayError):
    """A request the endpoint refuses, with the HTTP status that says why."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def media_type(header: str | None) -> str:
    """'Image/JPEG; charset=x' → 'image/jpeg' ('' when absent)."""
    return (header or "").split(";", 1)[0].strip().lower()


def negotiate(accept: str | None) -> str:
    """The response media type for an Accept header. JSON is all we produce, so anything that
    does not admit JSON is a 406; a missing or blank header means JSON (the SageMaker default)."""
    if not accept or not accept.strip():
        return JSON
    for part in accept.split(","):
        kind, *params = (p.strip() for p in part.split(";"))
        if kind.lower() in (JSON, "application/*", "*/*") and not any(_is_q_zero(p) for p in params):
            return JSON
    raise RequestError(406, f"cannot answer in {accept.strip()!r}: this endpoint produces {JSON}")


def _is_q_zero(param: str) -> bool:
    name, _, value = param.partition("=")
    try:
        return name.strip().lower() == "q" and float(value) == 0
    except ValueError:
        return False


def check_content_type(header: str | None) -> str:
    """The request's media type if we can read it; 415 otherwise."""
    kind = media_type(header)
    if not kind:
        raise RequestError(415, f"missing Content-Type: send one of {', '.join(CONTENT_TYPES)}")
    if kind not in CONTENT_TYPES:
        raise RequestError(415, f"unsupported Content-Type {kind!r}: send one of {', '.join(CONTENT_TYPES)}")
    return kind


def check_size(n_bytes: int, limit: int) -> None:
    if n_bytes > limit:
        raise RequestError(413, f"request body is {n_bytes:,} bytes; the limit is {limit:,}")


def decode_request(
    body: bytes | bytearray | memoryview | str,
    content_type: str | None,
    *,
    max_bytes: int = DEFAULT_MAX_BODY_BYTES,
    max_instances: int = DEFAULT_MAX_INSTANCES,
) -> list[bytes]:
    """Turn a request into the encoded images it carries (one for a raw image, N for JSON).

    Only the envelope is checked here; whether each payload is a readable image is decided by
    `preprocess`, with the same loader training used.
    """
    kind = check_content_type(content_type)
    # SageMaker's toolkit hands JSON bodies over as str, images as bytes or bytearray.
    data = body.encode("utf-8") if isinstance(body, str) else bytes(body)
    check_size(len(data), max_bytes)
    if not data:
        raise RequestError(400, "empty request body: send the image bytes" if kind != JSON else f"empty request body: send {JSON_SHAPE}")
    if kind == JSON:
        return _decode_instances(data, max_instances)
    return [data]


def _decode_instances(data: bytes, max_instances: int) -> list[bytes]:
    try:
        document = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise RequestError(422, f"request body is not valid JSON ({_first_line(e)}); expected {JSON_SHAPE}") from None
    instances = document.get("instances") if isinstance(document, dict) else None
    if not isinstance(instances, list) or not instances:
        raise RequestError(422, f"expected a non-empty 'instances' list: {JSON_SHAPE}")
    if len(instances) > max_instances:
        raise RequestError(413, f"{len(instances)} instances in one request; the limit is {max_instances}")
    return [_decode_instance(item, i) for i, item in enumerate(instances)]


def _decode_instance(item: Any, i: int) -> bytes:
    b64 = item.get("b64") if isinstance(item, dict) else None
    if not isinstance(b64, str):
        raise RequestError(422, f"instances[{i}] must be an object with a string 'b64' field: {JSON_SHAPE}")
    # Tolerate what browsers and `base64` produce: a data-URL prefix and line breaks.
    if b64.startswith("data:") and "," in b64[:200]:
        b64 = b64.split(",", 1)[1]
    try:
        data = base64.b64decode("".join(b64.split()), validate=True)
    except (binascii.Error, ValueError):
        raise RequestError(400, f"instances[{i}].b64 is not valid base64") from None
    if not data:
        raise RequestError(400, f"instances[{i}] is empty: no image bytes")
    return data


def preprocess(predictor: Predictor, payloads: list[bytes]) -> np.ndarray:
    """Decode every payload exactly as training did (uint8 N×S×S); the first bad one fails the
    whole request with a 400 that says which image and why."""
    images = []
    for i, data in enumerate(payloads):
        try:
            images.append(predictor.preprocess(data))
        except ImageError as e:
            reason = str(e).removeprefix("<bytes>: ")
            raise RequestError(400, reason if len(payloads) == 1 else f"instances[{i}]: {reason}") from None
    return np.stack(images)


def model_identity(predictor: Predictor) -> dict[str, Any]:
    """What answered: the backbone and a fingerprint of the bundle (its config.json, which pins the
    weights' SHA-256), so a client can tell which model made a prediction."""
    canonical = json.dumps(predictor.config.to_dict(), sort_keys=True, separators=(",", ":")).encode()
    return {
        "backbone": predictor.config.backbone,
        "fingerprint": hashlib.sha256(canonical).hexdigest()[:16],
        "classes": predictor.classes,
        "input_size": predictor.size,
        "package_version": predictor.config.package_version,
    }


def build_response(predictor: Predictor, scores: list[Scores], identity: dict[str, Any] | None = None) -> dict[str, Any]:
    """One response shape for one image or many: a `predictions` list in request order."""
    return {
        "predictions": [predictor.result(s) for s in scores],
        "model": identity or model_identity(predictor),
    }


def encode_json(document: Any) -> bytes:
    return json.dumps(document, separators=(",", ":")).encode("utf-8")


def error_document(message: str) -> dict[str, str]:
    return {"error": message}


def _first_line(e: Exception) -> str:
    return str(e).splitlines()[0] if str(e) else type(e).__name__
