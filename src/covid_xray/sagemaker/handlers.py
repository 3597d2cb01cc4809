"""The four functions SageMaker's PyTorch serving container calls, usable as `code/inference.py`:

    from covid_xray.sagemaker.handlers import model_fn, input_fn, predict_fn, output_fn

They are thin shells over `covid_xray.protocol`, exactly like the local server, so a bundle answers
the same requests the same way locally and on SageMaker. Refused requests raise the toolkit's
`GenericInferenceToolkitError` with our status (400, 406, 413, 415, 422) when the toolkit is
installed, so clients see the right status instead of a 500; elsewhere `RequestError` is raised.

The toolkit counts each function's parameters to decide whether to pass a context, so the
signatures below must stay exactly as they are.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from typing import Any, TypeVar

from .. import protocol
from ..inference import Predictor
from ..protocol import RequestError

T = TypeVar("T")


def _toolkit_errors(fn: Callable[..., T]) -> Callable[..., T]:
    @functools.wraps(fn)  # keeps the signature the toolkit inspects
    def wrapper(*args: Any) -> T:
        try:
            return fn(*args)
        except RequestError as e:
            try:
                from sagemaker_inference.errors import GenericInferenceToolkitError
            except ImportError:
                raise e from None
            raise GenericInferenceToolkitError(e.status, str(e)) from None

    return wrapper


def model_fn(model_dir: str | os.PathLike) -> Predictor:
    """Load the bundle that SageMaker unpacked from model.tar.gz into `model_dir`."""
    return Predictor.from_bundle(model_dir)


@_toolkit_errors
def input_fn(request_body: bytes | bytearray | str, request_content_type: str | None) -> list[bytes]:
    """The request → the encoded images it carries (one for a raw image, N for JSON instances)."""
    return protocol.decode_request(request_body, request_content_type)


@_toolkit_errors
def predict_fn(input_data: list[bytes], model: Predictor) -> dict[str, Any]:
    """Decode the images as training did and predict them in one batch."""
    images = protocol.preprocess(model, input_data)
    return protocol.build_response(model, model.score(images))


@_toolkit_errors
def output_fn(prediction: dict[str, Any], accept: str | None) -> tuple[bytes, str]:
    """Serialise for the client; the toolkit takes a (body, content type) tuple as it is."""
    return protocol.encode_json(prediction), protocol.negotiate(accept)
