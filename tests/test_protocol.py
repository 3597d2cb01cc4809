"""The request envelope shared by the server and the SageMaker handlers (no model needed)."""

from __future__ import annotations

import base64
import json

import pytest

from covid_xray.protocol import RequestError, decode_request, negotiate


def status_of(fn, *args, **kw) -> int:
    with pytest.raises(RequestError) as info:
        fn(*args, **kw)
    return info.value.status


@pytest.mark.parametrize("content_type", ["image/jpeg", "image/png", "application/x-image", "application/dicom",
                                          "IMAGE/JPEG; charset=binary"])
def test_raw_image_types_carry_one_payload(content_type):
    assert decode_request(b"\xff\xd8bytes", content_type) == [b"\xff\xd8bytes"]


def test_json_instances_in_order_whatever_the_body_type():
    images = [b"first", b"second", b"third"]
    doc = {"instances": [{"b64": base64.b64encode(i).decode()} for i in images]}
    # SageMaker's toolkit passes JSON as str; a plain HTTP server has bytes.
    assert decode_request(json.dumps(doc), "application/json") == images
    assert decode_request(json.dumps(doc).encode(), "application/json") == images


def test_b64_tolerates_data_urls_and_line_breaks():
    b64 = base64.encodebytes(b"x" * 200).decode()  # wrapped at 76 columns, like `base64`
    doc = {"instances": [{"b64": b64}, {"b64": "data:image/png;base64," + base64.b64encode(b"png").decode()}]}
    assert decode_request(json.dumps(doc), "application/json") == [b"x" * 200, b"png"]


@pytest.mark.parametrize(
    ("body", "content_type", "status"),
    [
        (b"x", None, 415),
        (b"x", "", 415),
        (b"x", "text/plain", 415),
        (b"x", "multipart/form-data; boundary=a", 415),
        (b"", "image/jpeg", 400),
        (b"", "application/json", 400),
        (b"{not json", "application/json", 422),
        (b"\xff\xfe", "application/json", 422),
        (b"[1, 2]", "application/json", 422),
        (b'{"instances": []}', "application/json", 422),
        (b'{"instances": "abc"}', "application/json", 422),
        (b'{"instances": [{"image": "abc"}]}', "application/json", 422),
        (b'{"instances": [{"b64": 5}]}', "application/json", 422),
        (b'{"instances": [{"b64": "***"}]}', "application/json", 400),
        (b'{"instances": [{"b64": "abc"}]}', "application/json", 400),  # bad padding
        (b'{"instances": [{"b64": ""}]}', "application/json", 400),
        (b"[" * 100_000 + b"]" * 100_000, "application/json", 422),  # nesting bomb
    ],
)
def test_bad_envelopes_get_a_fitting_status(body, content_type, status):
    assert status_of(decode_request, body, content_type) == status


def test_size_and_instance_limits_are_413():
    assert status_of(decode_request, b"x" * 11, "image/png", max_bytes=10) == 413
    doc = json.dumps({"instances": [{"b64": "eA=="}] * 3})
    assert status_of(decode_request, doc, "application/json", max_instances=2) == 413


@pytest.mark.parametrize("accept", [None, "", "application/json", "*/*", "application/*",
                                    "text/html, application/json;q=0.9", "application/json; charset=utf-8"])
def test_accept_admitting_json(accept):
    assert negotiate(accept) == "application/json"


@pytest.mark.parametrize("accept", ["text/csv", "image/png", "application/json;q=0", "text/html, application/xml"])
def test_accept_we_cannot_produce_is_406(accept):
    assert status_of(negotiate, accept) == 406
