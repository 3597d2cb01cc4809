"""The HTTP endpoint in-process (TestClient): every route, every error status, hostile input, and
the micro-batcher on its own."""

from __future__ import annotations

import base64
import json
import random
import threading
import time
from contextlib import ExitStack

import numpy as np
import pytest
from _serving import dicom_bytes, png_bomb, wait_ready
from _images import encode, xray_like
from fastapi.testclient import TestClient
from PIL import Image

from covid_xray.inference import Predictor
from covid_xray.batcher import Batcher, QueueFull
from covid_xray.server import ServerSettings, create_app

SETTINGS = ServerSettings(max_body_bytes=2 * 1024 * 1024, max_instances=4, queue_size=8)
CLIENT_ERRORS = {400, 406, 413, 415, 422}


@pytest.fixture(scope="module")
def client(untrained_bundle):
    with TestClient(create_app(untrained_bundle, SETTINGS)) as c:
        wait_ready(c)
        yield c


@pytest.fixture(scope="module")
def predictor(untrained_bundle) -> Predictor:
    return Predictor.from_bundle(untrained_bundle)


def post(client: TestClient, body: bytes | str, content_type: str | None, **headers):
    if content_type is not None:
        headers["content-type"] = content_type
    return client.post("/invocations", content=body, headers=headers)


def jpeg(seed: int = 0, size: int = 256) -> bytes:
    return encode(xray_like(size, seed=seed), "JPEG", quality=90)


def b64_doc(*images: bytes) -> str:
    return json.dumps({"instances": [{"b64": base64.b64encode(i).decode()} for i in images]})


def assert_matches(prediction: dict, expected: dict) -> None:
    assert prediction["label"] == expected["label"]
    assert list(prediction["probabilities"]) == list(expected["probabilities"])  # bundle order
    np.testing.assert_allclose(list(prediction["probabilities"].values()),
                               list(expected["probabilities"].values()), atol=1e-4)
    assert (prediction["ood"], prediction["refer"]) == (expected["ood"], expected["refer"])
    assert prediction["ood_score"] == pytest.approx(expected["ood_score"], abs=1e-4)


# --- routes ----------------------------------------------------------------------------------


def test_ping_is_503_until_the_model_is_loaded(untrained_bundle):
    client = TestClient(create_app(untrained_bundle))  # not started: the model is not loaded yet
    r = client.get("/ping")
    assert r.status_code == 503 and r.json() == {"status": "loading"}
    r = post(client, jpeg(), "image/jpeg")
    assert r.status_code == 503 and "GET /ping" in r.json()["error"]


def test_ping_says_why_when_the_bundle_cannot_load(tmp_path):
    with TestClient(create_app(tmp_path)) as client:
        deadline = time.monotonic() + 30
        while (body := client.get("/ping").json())["status"] == "loading" and time.monotonic() < deadline:
            time.sleep(0.05)
        assert body["status"] == "failed" and "not a model bundle" in body["error"]
        assert post(client, jpeg(), "image/jpeg").status_code == 503


def test_ping_reports_the_model(client, predictor):
    r = client.get("/ping")
    assert r.status_code == 200
    model = r.json()["model"]
    assert model["backbone"] == "tf_efficientnet_lite0"
    assert model["classes"] == predictor.classes
    assert len(model["fingerprint"]) == 16


@pytest.mark.parametrize(
    ("content_type", "make"),
    [
        ("image/jpeg", lambda: jpeg(1)),
        ("image/png", lambda: encode(xray_like(200, seed=1), "PNG")),
        ("application/x-image", lambda: encode(xray_like(200, seed=1, mode="RGB"), "BMP")),
        ("application/dicom", lambda: dicom_bytes(np.asarray(xray_like(128, seed=1), np.uint16) * 200)),
    ],
)
def test_every_image_type_predicts_like_the_predictor(client, predictor, content_type, make):
    body = make()
    r = post(client, body, content_type)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "application/json"
    doc = r.json()
    assert len(doc["predictions"]) == 1
    assert_matches(doc["predictions"][0], predictor.predict([body])[0])
    assert doc["model"] == client.get("/ping").json()["model"]


def test_json_batch_answers_each_instance_in_order(client, predictor):
    images = [jpeg(seed) for seed in (3, 4, 5)]
    r = post(client, b64_doc(*images), "application/json")
    assert r.status_code == 200, r.text
    predictions = r.json()["predictions"]
    for got, expected in zip(predictions, predictor.predict(images), strict=True):
        assert_matches(got, expected)
    assert sum(predictions[0]["probabilities"].values()) == pytest.approx(1, abs=1e-4)


def test_every_prediction_carries_the_ood_and_referral_flags(client):
    """An X-ray-like film passes the guard; noise and a blank image are flagged, and flagged means refer."""
    noise = encode(Image.fromarray(np.random.default_rng(0).integers(0, 256, (256, 256), dtype=np.uint8)), "PNG")
    blank = encode(Image.new("L", (256, 256), 255), "PNG")
    film, *outliers = post(client, b64_doc(jpeg(seed=5), noise, blank), "application/json").json()["predictions"]
    assert film["ood"] is False and isinstance(film["refer"], bool)
    for p in outliers:
        assert p["ood"] is True and p["refer"] is True and p["ood_score"] > film["ood_score"]


@pytest.mark.parametrize("accept", ["application/json", "*/*", "text/html, application/json;q=0.5"])
def test_accept_admitting_json_is_served(client, accept):
    assert post(client, jpeg(), "image/jpeg", accept=accept).status_code == 200


def test_page_is_served_with_room_for_later_flags(client):
    r = client.get("/")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    for element in ('id="file-input"', 'id="result-label"', 'id="bars"', 'id="flags"', 'id="heatmap"', 'id="error"'):
        assert element in r.text


def test_rolling_window_flags_a_stream_of_shifted_films(untrained_bundle):
    """/stats → site: too few films says nothing; films like the training ones are not shifted; a stream of
    films from elsewhere (here: inverted, blurred, re-framed films) flips the flag."""
    from PIL import ImageFilter, ImageOps

    def shifted(seed: int) -> bytes:
        film = xray_like(256, seed=seed).convert("L")
        return encode(ImageOps.invert(film.filter(ImageFilter.GaussianBlur(6)).crop((0, 0, 140, 256))), "PNG")

    with TestClient(create_app(untrained_bundle, SETTINGS)) as fresh:
        wait_ready(fresh)
        post(fresh, encode(xray_like(256, seed=5000), "JPEG"), "image/jpeg")
        assert fresh.get("/stats").json()["site"]["shifted"] is None  # one film says nothing
        for i in range(40):
            post(fresh, encode(xray_like(256, seed=5001 + i), "JPEG"), "image/jpeg")
        site = fresh.get("/stats").json()["site"]
        assert site["n"] == 41 and site["shifted"] is False, site
        for i in range(60):
            assert post(fresh, shifted(6000 + i), "image/png").status_code == 200
        site = fresh.get("/stats").json()["site"]
        assert site["n"] == 101 and site["shifted"] is True and site["reasons"], site
        assert "shifted" in site["verdict"]


def test_stats_show_batches_and_settings(client):
    post(client, jpeg(), "image/jpeg")
    stats = client.get("/stats").json()
    assert stats["ready"] is True
    assert stats["batcher"]["images"] >= 1 and stats["batcher"]["batches"] >= 1
    assert stats["settings"]["max_body_bytes"] == SETTINGS.max_body_bytes


# --- every error status ----------------------------------------------------------------------


def truncated_jpeg() -> bytes:
    data = jpeg(7)
    return data[: len(data) // 2]


def huge_jpeg_header() -> bytes:
    """A small JPEG whose frame header claims 60000×60000 pixels."""
    data = bytearray(jpeg(8, size=64))
    sof = data.index(b"\xff\xc0")
    data[sof + 5 : sof + 9] = (60000).to_bytes(2, "big") * 2
    return bytes(data)


@pytest.mark.parametrize(
    ("body", "content_type", "status", "says"),
    [
        (b"", "image/jpeg", 400, "empty"),
        (b"this is not an image", "image/png", 400, "not an image"),
        (truncated_jpeg(), "image/jpeg", 400, "corrupt image"),
        (png_bomb(), "image/png", 400, "larger than"),
        (huge_jpeg_header(), "image/jpeg", 400, "larger than"),
        (dicom_bytes(rows=60000, columns=60000), "application/dicom", 400, "larger than"),
        (b'{"instances": [{"b64": "%%%"}]}', "application/json", 400, "base64"),
        (b"x" * (SETTINGS.max_body_bytes + 1), "image/png", 413, "limit"),
        (b64_doc(*[b"x"] * 5), "application/json", 413, "instances"),
        (jpeg(), "image/gif", 415, "image/gif"),
        (jpeg(), None, 415, "Content-Type"),
        (b"{oops", "application/json", 422, "not valid JSON"),
        (b'{"images": []}', "application/json", 422, "instances"),
    ],
)
def test_bad_requests_get_a_json_error_with_a_fitting_status(client, body, content_type, status, says):
    r = post(client, body, content_type)
    assert r.status_code == status, r.text
    assert r.headers["content-type"] == "application/json"
    assert says in r.json()["error"]
    assert "Traceback" not in r.text


def test_bad_instance_is_named(client):
    r = post(client, b64_doc(jpeg(), b"garbage"), "application/json")
    assert r.status_code == 400 and r.json()["error"].startswith("instances[1]:")


def test_oversized_body_is_refused_from_its_declared_length(client):
    r = client.post("/invocations", content=b"x" * 10,
                    headers={"content-type": "image/png", "content-length": str(SETTINGS.max_body_bytes + 1)})
    assert r.status_code == 413


def test_accept_we_cannot_produce_is_406(client):
    r = post(client, jpeg(), "image/jpeg", accept="text/csv")
    assert r.status_code == 406 and "application/json" in r.json()["error"]


def test_unknown_route_and_method_are_json_errors(client):
    assert client.get("/nowhere").json() == {"error": "Not Found"}
    r = client.get("/invocations")
    assert r.status_code == 405 and r.json()["error"] and "POST" in r.headers["allow"]


def test_full_queue_is_503_and_recovers(client):
    batcher = client.app.state.model.batcher
    with ExitStack() as held:
        for _ in range(batcher.queue_size):  # every place taken by a request still decoding
            held.enter_context(batcher.admit())
        r = post(client, jpeg(), "image/jpeg")
    assert r.status_code == 503 and "busy" in r.json()["error"]
    assert post(client, jpeg(), "image/jpeg").status_code == 200


def hostile_requests(n: int = 200, seed: int = 0) -> list[tuple[bytes, str | None, dict]]:
    """Wrong types, truncated images, huge dimensions, bad base64, empty bodies, junk JSON."""
    rng = random.Random(seed)
    good = jpeg(9)
    png = encode(xray_like(128, seed=9), "PNG")
    fixed = [
        (b"", "image/jpeg", {}), (b"", "application/json", {}), (b"", "application/dicom", {}), (b"", None, {}),
        (good, "text/plain", {}), (good, "image/webp", {}), (good, "video/mp4", {}), (good, "", {}),
        (good, "multipart/form-data; boundary=x", {}), (good, "application/octet-stream", {}),
        (png_bomb(), "image/png", {}), (png_bomb(100_000, 2_000), "image/png", {}), (huge_jpeg_header(), "image/jpeg", {}),
        (dicom_bytes(rows=65535, columns=65535), "application/dicom", {}),
        (b"\0" * 128 + b"DICM" + b"\xff" * 300, "application/dicom", {}),
        (b"{", "application/json", {}), (b"null", "application/json", {}), (b"[]", "application/json", {}),
        (b'{"instances": null}', "application/json", {}), (b'{"instances": [null]}', "application/json", {}),
        (b'{"instances": [{"b64": null}]}', "application/json", {}), (b'{"instances": [1e999]}', "application/json", {}),
        (b'{"instances": [{"b64": NaN}]}', "application/json", {}), (b"[" * 50_000, "application/json", {}),
        (b64_doc(b"\x89PNG\r\n\x1a\n"), "application/json", {}), (b64_doc(*[good] * 50), "application/json", {}),
        (good, "image/jpeg", {"accept": "image/png"}), (good, "image/jpeg", {"accept": "text/csv;q=1, */*;q=0"}),
        (b"x" * (SETTINGS.max_body_bytes + 10), "image/jpeg", {}),
    ]
    requests = list(fixed)
    while len(requests) < n:
        kind = rng.randrange(5)
        if kind == 0:  # truncated or bit-flipped image
            data = bytearray(rng.choice([good, png]))
            data = data[: rng.randrange(1, len(data) - 1)]
            for _ in range(rng.randrange(0, 5)):
                data[rng.randrange(len(data))] = rng.randrange(256)
            requests.append((bytes(data), rng.choice(["image/jpeg", "image/png", "application/x-image"]), {}))
        elif kind == 1:  # random bytes
            requests.append((rng.randbytes(rng.randrange(1, 4000)), rng.choice(["image/jpeg", "application/dicom"]), {}))
        elif kind == 2:  # bad base64
            junk = "".join(rng.choice("abc!@#$%^&*()=-_~") for _ in range(rng.randrange(1, 50)))
            requests.append((json.dumps({"instances": [{"b64": junk}]}).encode(), "application/json", {}))
        elif kind == 3:  # valid base64 of junk
            requests.append((b64_doc(rng.randbytes(rng.randrange(1, 500))), "application/json", {}))
        else:  # JSON of the wrong shape
            doc = rng.choice([{"instances": rng.randrange(9)}, {"b64": "eA=="}, ["instances"], {"instances": [[]]},
                              {"instances": [{"b64": ["eA=="]}]}, "just a string"])
            requests.append((json.dumps(doc).encode(), "application/json", {}))
    return requests[:n]


def test_200_hostile_requests_get_4xx_and_the_server_survives(client):
    statuses = []
    for body, content_type, headers in hostile_requests(200):
        r = post(client, body, content_type, **headers)
        statuses.append(r.status_code)
        assert r.status_code in CLIENT_ERRORS, (r.status_code, content_type, body[:60], r.text)
        assert "error" in r.json() and "Traceback" not in r.text
    assert {400, 406, 413, 415, 422} <= set(statuses)
    assert client.get("/ping").status_code == 200
    assert post(client, jpeg(), "image/jpeg").status_code == 200


# --- the batcher on its own ------------------------------------------------------------------


class GatedModel:
    """A stand-in model whose first call blocks until released, recording each batch size."""

    def __init__(self) -> None:
        self.release, self.started, self.sizes = threading.Event(), threading.Event(), []

    def __call__(self, images: np.ndarray) -> np.ndarray:
        self.sizes.append(len(images))
        self.started.set()
        self.release.wait(10)
        return images.reshape(len(images), -1)[:, :2].astype(np.float32)


def test_batcher_groups_what_queued_during_a_forward_pass():
    model = GatedModel()
    batcher = Batcher(model, max_batch_size=4, max_wait_s=0.0, queue_size=16).start()
    try:
        first = batcher.submit(np.zeros((1, 2, 2), np.uint8))
        assert model.started.wait(5)  # the model is busy with the first request...
        later = [batcher.submit(np.full((1, 2, 2), i, np.uint8))[0] for i in range(6)]  # ...while 6 queue up
        model.release.set()
        results = [f.result(5) for f in first + later]
    finally:
        batcher.close()
    assert model.sizes == [1, 4, 2]  # max_batch_size caps a batch
    assert [r[0] for r in results[1:]] == list(range(6))  # each caller gets its own row back
    assert batcher.stats()["max_batch_size_seen"] == 4


def test_batcher_does_not_keep_a_lone_request_waiting():
    model = GatedModel()
    model.release.set()
    batcher = Batcher(model, max_batch_size=8, max_wait_s=5.0, queue_size=8).start()
    try:
        start = time.monotonic()
        batcher.submit(np.zeros((1, 2, 2), np.uint8))[0].result(10)
        assert time.monotonic() - start < 2.5  # nothing else is decoding, so no reason to wait 5 s
    finally:
        batcher.close()


def test_batcher_waits_for_a_request_still_decoding():
    model = GatedModel()
    model.release.set()
    batcher = Batcher(model, max_batch_size=8, max_wait_s=5.0, queue_size=8).start()
    try:
        with batcher.admit():  # a second request is being decoded...
            first = batcher.submit(np.zeros((1, 2, 2), np.uint8))
            time.sleep(0.2)
            second = batcher.submit(np.ones((1, 2, 2), np.uint8))  # ...and arrives within max_wait
        [f.result(10) for f in first + second]
    finally:
        batcher.close()
    assert model.sizes == [2]


def test_batcher_threads_share_the_queue_and_run_at_once():
    meet = threading.Barrier(2, timeout=10)

    def model(images: np.ndarray) -> np.ndarray:
        meet.wait()  # only passes if two forward passes are in flight together
        return images.reshape(len(images), -1)[:, :2].astype(np.float32)

    batcher = Batcher(model, max_batch_size=8, max_wait_s=0.0, queue_size=8, threads=2).start()
    try:
        time.sleep(0.2)  # both threads waiting for work
        futures = batcher.submit(np.zeros((2, 2, 2), np.uint8))
        [f.result(10) for f in futures]
    finally:
        batcher.close()
    assert batcher.stats()["batch_size_histogram"] == {"1": 2}  # split, not one batch of 2


def test_batcher_bounds_its_queue():
    model = GatedModel()
    batcher = Batcher(model, max_batch_size=1, max_wait_s=0.0, queue_size=2).start()
    try:
        batcher.submit(np.zeros((1, 2, 2), np.uint8))
        assert model.started.wait(5)
        batcher.submit(np.zeros((2, 2, 2), np.uint8))  # fills the queue
        with pytest.raises(QueueFull) as info:
            batcher.submit(np.zeros((1, 2, 2), np.uint8))
        assert info.value.status == 503
        with pytest.raises(QueueFull), batcher.admit():
            pass
    finally:
        model.release.set()
        batcher.close()


# --- a real model on real X-rays -------------------------------------------------------------


@pytest.mark.slow
def test_trained_bundle_served_scores_like_its_evaluation(trained_run, dataset_dir):
    """The endpoint is the evaluated model: over the real test split it gets the accuracy that
    training reported, so nothing in the serving path changes what the model sees."""
    from covid_xray.data import discover

    bundle = trained_run.run_dir / "model"
    dataset = discover(dataset_dir)
    samples = dataset["test"]
    labels: list[str] = []
    with TestClient(create_app(bundle)) as client:
        wait_ready(client)
        for start in range(0, len(samples), 16):
            chunk = samples[start : start + 16]
            r = post(client, b64_doc(*(s.path.read_bytes() for s in chunk)), "application/json")
            assert r.status_code == 200, r.text
            labels += [p["label"] for p in r.json()["predictions"]]
    accuracy = np.mean([label == dataset.classes[s.label] for label, s in zip(labels, samples, strict=True)])
    reported = trained_run.metrics["test"]
    assert len(samples) == reported["n"]
    assert accuracy == pytest.approx(reported["accuracy"], abs=1.01 / reported["n"])  # at most one borderline flip
