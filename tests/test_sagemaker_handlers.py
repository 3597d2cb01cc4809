"""The SageMaker handlers answer exactly like the HTTP server: same decoding, same JSON."""

from __future__ import annotations

import base64
import inspect
import json

import pytest
from _serving import wait_ready
from _images import encode, xray_like
from fastapi.testclient import TestClient

from covid_xray.protocol import RequestError
from covid_xray.sagemaker import handlers
from covid_xray.server import create_app


@pytest.fixture(scope="module")
def model(untrained_bundle):
    return handlers.model_fn(str(untrained_bundle))


def invoke(model, body, content_type, accept="application/json"):
    """What the SageMaker inference toolkit does with the four functions."""
    data = handlers.input_fn(body, content_type)
    return handlers.output_fn(handlers.predict_fn(data, model), accept)


def test_signatures_match_what_the_toolkit_counts():
    # The toolkit passes a context when a function has one more parameter than expected.
    counts = {name: len(inspect.signature(getattr(handlers, name)).parameters)
              for name in ("model_fn", "input_fn", "predict_fn", "output_fn")}
    assert counts == {"model_fn": 1, "input_fn": 2, "predict_fn": 2, "output_fn": 2}


def test_handlers_and_server_give_the_same_answer(model, untrained_bundle):
    image = encode(xray_like(300, seed=11), "JPEG")
    doc = json.dumps({"instances": [{"b64": base64.b64encode(image).decode()}] * 2})
    with TestClient(create_app(untrained_bundle)) as client:
        wait_ready(client)
        for body, content_type in [(image, "image/jpeg"), (doc, "application/json")]:
            served = client.post("/invocations", content=body, headers={"content-type": content_type})
            # The toolkit hands JSON bodies over as str and images as bytearray.
            sm_body = body if isinstance(body, str) else bytearray(body)
            payload, accept = invoke(model, sm_body, content_type)
            assert accept == "application/json"
            assert json.loads(payload) == served.json()


@pytest.mark.parametrize(
    ("body", "content_type", "accept", "status"),
    [
        (b"not an image", "image/png", "application/json", 400),
        (b"", "image/jpeg", "application/json", 400),
        (b"{", "application/json", "application/json", 422),
        (b"x", "text/csv", "application/json", 415),
        (encode(xray_like(64), "PNG"), "image/png", "text/csv", 406),
    ],
)
def test_refusals_carry_the_same_status(model, body, content_type, accept, status):
    with pytest.raises(RequestError) as info:  # the toolkit is not installed here
        invoke(model, body, content_type, accept)
    assert info.value.status == status
