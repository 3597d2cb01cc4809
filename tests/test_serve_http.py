"""A real `covid-xray serve` process over loopback HTTP: the protocol, concurrency and
micro-batching, and the web page in headless Chromium."""

from __future__ import annotations

import base64
import collections
import json
import os
import shutil
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest
from _serving import ServeProcess
from _images import encode, xray_like
from PIL import Image

from covid_xray.inference import Predictor

CHROMIUM_ARGS = ["--no-sandbox", "--headless", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]


@pytest.fixture(scope="module")
def server(untrained_bundle):
    process = ServeProcess(untrained_bundle, "--max-batch-size", "8")
    try:
        process.wait_ready()
        yield process
    finally:
        log = process.stop()
    assert process.proc.returncode == 0, log
    assert "Traceback" not in log, log


@pytest.fixture(scope="module")
def predictor(untrained_bundle) -> Predictor:
    return Predictor.from_bundle(untrained_bundle)


def test_real_server_speaks_the_protocol(server, predictor):
    ping = httpx.get(f"{server.url}/ping")
    assert ping.status_code == 200 and ping.json()["model"]["classes"] == predictor.classes
    image = encode(xray_like(512, seed=2), "JPEG")
    r = httpx.post(f"{server.url}/invocations", content=image, headers={"content-type": "image/jpeg"})
    assert r.status_code == 200
    assert r.json()["predictions"][0]["label"] == predictor.predict([image])[0]["label"]
    r = httpx.post(f"{server.url}/invocations", content=b"", headers={"content-type": "image/jpeg"})
    assert r.status_code == 400 and "empty" in r.json()["error"]
    assert "<title>" in httpx.get(f"{server.url}/").text


def test_concurrent_clients_get_their_own_correct_answers_in_batches(server, predictor):
    clients, per_client = 8, 25
    images = [encode(xray_like(384, seed=100 + c), "JPEG") for c in range(clients)]
    expected = predictor.predict(images)
    before = httpx.get(f"{server.url}/stats").json()["batcher"]["batch_size_histogram"]

    def client(c: int) -> list[dict]:
        with httpx.Client(base_url=server.url, timeout=60) as http:
            return [http.post("/invocations", content=images[c], headers={"content-type": "image/jpeg"})
                    for _ in range(per_client)]

    with ThreadPoolExecutor(clients) as pool:
        responses = list(pool.map(client, range(clients)))
    for c, answers in enumerate(responses):
        for r in answers:
            assert r.status_code == 200, r.text
            got = r.json()["predictions"][0]
            assert got["label"] == expected[c]["label"]
            np.testing.assert_allclose(list(got["probabilities"].values()),
                                       list(expected[c]["probabilities"].values()), atol=1e-4)

    after = httpx.get(f"{server.url}/stats").json()["batcher"]["batch_size_histogram"]
    sizes = collections.Counter({int(k): v for k, v in after.items()})
    sizes.subtract({int(k): v for k, v in before.items()})
    assert sum(k * v for k, v in sizes.items()) == clients * per_client  # every image went through the model once
    assert max(k for k, v in sizes.items() if v > 0) > 1, f"never batched: {dict(sizes)}"
    assert sum(sizes.values()) < clients * per_client * 0.75, f"mostly unbatched: {dict(sizes)}"


def test_json_batch_over_http(server, predictor):
    images = [encode(xray_like(256, seed=s), "PNG") for s in (30, 31)]
    doc = {"instances": [{"b64": base64.b64encode(i).decode()} for i in images]}
    r = httpx.post(f"{server.url}/invocations", content=json.dumps(doc), headers={"content-type": "application/json"})
    assert [p["label"] for p in r.json()["predictions"]] == [e["label"] for e in predictor.predict(images)]


def test_several_worker_processes(untrained_bundle):
    process = ServeProcess(untrained_bundle, "--workers", "2")
    try:
        process.wait_ready()
        image = encode(xray_like(256, seed=3), "JPEG")
        for _ in range(4):
            r = httpx.post(f"{process.url}/invocations", content=image, headers={"content-type": "image/jpeg"})
            assert r.status_code == 200
    finally:
        log = process.stop()
    assert "Traceback" not in log, log


def test_worker_processes_accept_connections_with_nagle_off():
    # With Nagle on, each keep-alive request after the first waited ~40 ms for a delayed ACK.
    import socket

    import uvicorn

    from covid_xray.server import bind_listener

    listener = bind_listener(uvicorn.Config("covid_xray.server:app_from_env", host="127.0.0.1", port=0))
    listener.listen()  # as the server does when it starts
    with listener, socket.create_connection(listener.getsockname()[:2]):
        accepted, _ = listener.accept()
        with accepted:
            assert accepted.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)


# --- the page in a real browser --------------------------------------------------------------
# Waits are selectors, not JavaScript predicates: the page's Content-Security-Policy forbids the eval
# that Playwright's wait_for_function needs, as it should.


@pytest.fixture(scope="module")
def browser():
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install -e '.[test]')")
    executable = os.environ.get("CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
    if not executable:
        pytest.skip("chromium is not installed (apt-get install -y chromium)")
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=executable, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@pytest.fixture
def page(browser, server):
    context = browser.new_context(viewport={"width": 1366, "height": 768})  # a common laptop screen
    page = context.new_page()
    page.goto(f"{server.url}/")
    page.wait_for_selector("#model:has-text('·')")
    yield page
    context.close()


def test_page_upload_shows_the_predicted_label(page, predictor, tmp_path):
    path = tmp_path / "chest.png"
    path.write_bytes(encode(xray_like(400, seed=42), "PNG"))
    expected = predictor.predict([path])[0]

    page.set_input_files("#file-input", str(path))
    page.wait_for_selector("#result-label:not(.placeholder)")
    assert page.text_content("#result-label") == expected["label"]
    bars = page.locator("#bars li")
    assert bars.count() == len(predictor.classes)
    top = page.locator("#bars li.top")
    assert top.get_attribute("data-class") == expected["label"]
    page.wait_for_timeout(500)  # the bars animate to their width
    track, fill = top.locator(".track").bounding_box(), top.locator(".fill").bounding_box()
    share = expected["probabilities"][expected["label"]]
    assert fill["width"] == pytest.approx(share * track["width"], abs=3)
    assert page.is_visible("#preview") and page.is_hidden("#error")
    # Fits a laptop screen: no sideways scrolling, the answer visible without scrolling.
    assert page.evaluate("document.documentElement.scrollWidth <= window.innerWidth")
    box = page.locator("#result-label").bounding_box()
    assert box and box["y"] + box["height"] <= 768


def test_page_overlays_the_heatmap_with_a_toggle_and_warns_about_a_non_xray(page, tmp_path):
    film = tmp_path / "chest.png"
    film.write_bytes(encode(xray_like(400, seed=44), "PNG"))
    page.set_input_files("#file-input", str(film))
    page.wait_for_selector("#heatmap", state="visible")
    heat, preview = page.locator("#heatmap").bounding_box(), page.locator("#preview").bounding_box()
    for key in ("x", "y", "width", "height"):  # drawn exactly over the X-ray
        assert heat[key] == pytest.approx(preview[key], abs=2)
    assert "not look like a chest X-ray" not in page.text_content("#flags")
    page.click("#show-heatmap")
    assert page.is_hidden("#heatmap")
    page.click("#show-heatmap")
    page.wait_for_selector("#heatmap", state="visible")

    noise = tmp_path / "noise.png"
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (300, 300), dtype=np.uint8)).save(noise)
    page.set_input_files("#file-input", str(noise))
    page.wait_for_selector("#flags:has-text('not look like a chest X-ray')")
    assert "refer the image to a radiologist" in page.text_content("#flags")


def test_page_drop_and_error_message(page, predictor):
    image = encode(xray_like(300, seed=43), "JPEG")
    drop = """([b64, name, type]) => {
        const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
        const data = new DataTransfer();
        data.items.add(new File([bytes], name, { type }));
        document.getElementById('drop').dispatchEvent(new DragEvent('drop', { dataTransfer: data, bubbles: true }));
    }"""
    page.evaluate(drop, [base64.b64encode(image).decode(), "dropped.jpg", "image/jpeg"])
    page.wait_for_selector("#result-label:not(.placeholder)")
    assert page.text_content("#result-label") == predictor.predict([image])[0]["label"]

    page.evaluate(drop, [base64.b64encode(b"definitely not an x-ray").decode(), "notes.png", "image/png"])
    page.wait_for_selector("#error", state="visible")
    assert "could not be analysed" in page.text_content("#error")
    assert "not an image" in page.text_content("#error")
    assert page.text_content("#result-label") == "—"


def test_page_shows_a_banner_when_recent_films_look_shifted(browser, untrained_bundle, tmp_path):
    """A fresh server (its own rolling window): no banner at first; after a stream of films unlike the training
    ones, the next upload brings up the banner."""
    from PIL import ImageFilter, ImageOps

    def shifted(seed: int) -> bytes:
        film = xray_like(256, seed=seed).convert("L").filter(ImageFilter.GaussianBlur(6)).crop((0, 0, 140, 256))
        return encode(ImageOps.invert(film), "PNG")

    process = ServeProcess(untrained_bundle)
    try:
        process.wait_ready()
        context = browser.new_context()
        page = context.new_page()
        page.goto(f"{process.url}/")
        page.wait_for_selector("#model:has-text('·')")
        assert page.is_hidden("#site-banner")
        for i in range(40):
            httpx.post(f"{process.url}/invocations", content=shifted(8000 + i), headers={"content-type": "image/png"},
                       timeout=30).raise_for_status()
        path = tmp_path / "one-more.png"
        path.write_bytes(shifted(9000))
        page.set_input_files("#file-input", str(path))
        page.wait_for_selector("#site-banner", state="visible")
        assert "do not look like the training data" in page.text_content("#site-banner")
        assert "radiologist" in page.text_content("#flags")  # the film itself is referred, and says why
        context.close()
    finally:
        process.stop()


def test_sigterm_drains_in_flight_requests(untrained_bundle):
    """SIGTERM while a large batch is being predicted: the request still gets its answer, then the
    server exits cleanly (as an orchestrator stopping a container expects)."""
    process = ServeProcess(untrained_bundle, "--max-instances", "64")
    process.wait_ready()
    image = base64.b64encode(encode(xray_like(1024))).decode()
    body = json.dumps({"instances": [{"b64": image}] * 48})
    result = {}

    def call():
        result["response"] = httpx.post(f"{process.url}/invocations", content=body,
                                        headers={"Content-Type": "application/json"}, timeout=120)

    client = threading.Thread(target=call)
    client.start()
    time.sleep(0.3)  # the request is in flight: decoding 48 images and predicting takes longer than this
    process.proc.send_signal(signal.SIGTERM)
    client.join(timeout=120)
    response = result["response"]
    assert response.status_code == 200 and len(response.json()["predictions"]) == 48
    # uvicorn shuts down gracefully, then re-raises the signal so the exit status says why it stopped.
    assert process.proc.wait(timeout=60) in (0, -signal.SIGTERM)
    log = process.proc.stdout.read()
    assert "Finished server process" in log and "Traceback" not in log, log


def test_server_on_a_tampered_bundle_reports_503_with_the_reason(untrained_bundle, tmp_path):
    bundle = shutil.copytree(untrained_bundle, tmp_path / "bundle")
    weights = bundle / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])  # truncated
    process = ServeProcess(bundle)
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                ping = httpx.get(f"{process.url}/ping", timeout=2)
                if ping.json().get("status") == "failed":
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "server never reported the broken bundle"
            time.sleep(0.2)
        assert ping.status_code == 503 and "checksum" in ping.json()["error"]
    finally:
        process.stop()


def test_page_asks_for_the_api_key_and_keeps_it_for_the_tab_only(browser, untrained_bundle, predictor, tmp_path):
    key = "ward-seven-key-" + "c" * 24
    process = ServeProcess(untrained_bundle, env={"COVID_XRAY_API_KEYS": key})
    try:
        process.wait_ready()
        context = browser.new_context()
        page = context.new_page()
        blocked = []  # what the Content-Security-Policy refused: nothing of the page's own may be
        page.on("console", lambda m: blocked.append(m.text) if "Content Security Policy" in m.text else None)
        page.goto(f"{process.url}/")
        page.wait_for_selector("#key-form", state="visible")  # /stats answered 401
        film = tmp_path / "chest.png"
        film.write_bytes(encode(xray_like(400, seed=45), "PNG"))
        page.set_input_files("#file-input", str(film))
        page.wait_for_selector("#error:has-text('API key is needed')")

        page.fill("#api-key", "not-the-key-" + "d" * 24)
        page.click("#key-form button")
        page.wait_for_selector("#key-message:has-text('did not accept')")
        page.fill("#api-key", key)
        page.click("#key-form button")  # the film waiting for a key is sent again
        page.wait_for_selector("#result-label:not(.placeholder)")
        assert page.text_content("#result-label") == predictor.predict([film])[0]["label"]
        assert page.is_hidden("#key-form") and page.is_hidden("#error")
        assert page.evaluate("sessionStorage.getItem('covid-xray-api-key')") == key
        assert page.evaluate("localStorage.length") == 0

        another_tab = context.new_page()
        another_tab.goto(f"{process.url}/")
        another_tab.wait_for_selector("#key-form", state="visible")
        assert not blocked, blocked
        context.close()
    finally:
        log = process.stop()
    assert key not in log and "wrong API key" in log
