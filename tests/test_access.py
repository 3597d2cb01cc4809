"""Endpoint security: API keys, the refusal to serve openly beyond loopback, the rate limit, HTTPS,
the security headers, and patient data (DICOM headers) kept out of every response, log and statistic."""

from __future__ import annotations

import json
import logging
import ssl

import httpx
import pydicom
import pytest
from _images import encode, xray_like
from _serving import PATIENT, ServeProcess, dicom_bytes, wait_ready
from fastapi.testclient import TestClient
from test_server import SETTINGS, hostile_requests

from covid_xray import cli
from covid_xray.access import CSP, KEYS_ENV, AccessSettings, RateLimiter, read_keys
from covid_xray.errors import CovidXrayError
from covid_xray.server import create_app

KEY = "k3y-for-the-ward-" + "a" * 24
OTHER = "another-valid-key-" + "b" * 24
JPEG = encode(xray_like(256, seed=5), "JPEG")


@pytest.fixture(scope="module")
def keyed(untrained_bundle):
    access = AccessSettings.for_host("127.0.0.1", [KEY, OTHER])
    with TestClient(create_app(untrained_bundle, SETTINGS, access=access)) as client:
        wait_ready(client)
        yield client


def bearer(key: str) -> dict[str, str]:
    return {"authorization": f"Bearer {key}"}


PROTECTED = [("POST", "/invocations"), ("GET", "/stats"), ("POST", "/invocations?heatmap=true"), ("GET", "/nowhere")]
WRONG = {
    "no key": {},
    "wrong key": bearer("x" * 40),
    "key of the wrong form": bearer("has spaces in it"),
    "Basic scheme": {"authorization": "Basic " + KEY},
    "Bearer without a key": {"authorization": "Bearer"},
    "a valid key's prefix": bearer(KEY[:-1]),
}


@pytest.mark.parametrize("method, path", PROTECTED)
@pytest.mark.parametrize("case", WRONG)
def test_every_protected_route_answers_401_without_the_right_key(keyed, method, path, case, caplog):
    with caplog.at_level(logging.WARNING, logger="covid_xray.access"):
        r = keyed.request(method, path, content=JPEG, headers={"content-type": "image/jpeg", **WRONG[case]})
    assert r.status_code == 401, r.text
    assert "Authorization: Bearer" in r.json()["error"]
    assert r.headers["www-authenticate"].startswith('Bearer realm="covid-xray"')
    assert f"refused {method} {path.split('?')[0]}" in caplog.text
    assert KEY not in caplog.text and "x" * 40 not in caplog.text  # the attempt is logged, never what was sent


def test_the_right_keys_open_every_route_and_ping_and_page_stay_open(keyed):
    for key in (KEY, OTHER):
        r = keyed.post("/invocations", content=JPEG, headers={"content-type": "image/jpeg", **bearer(key)})
        assert r.status_code == 200 and r.json()["predictions"][0]["label"]
        assert keyed.get("/stats", headers=bearer(key)).status_code == 200
    assert keyed.get("/ping").status_code == 200
    for path in ("/", "/page.js", "/page.css"):  # static, no data: the page must load to ask for the key
        assert keyed.get(path).status_code == 200


def test_hostile_requests_get_no_5xx_with_or_without_keys(keyed):
    for body, content_type, headers in hostile_requests(200):
        headers = {**headers, **({"content-type": content_type} if content_type is not None else {})}
        without = keyed.post("/invocations", content=body, headers=headers)
        assert without.status_code == 401
        with_key = keyed.post("/invocations", content=body, headers={**headers, **bearer(KEY)})
        assert 400 <= with_key.status_code < 500 and with_key.status_code != 401, with_key.text


def test_security_headers_on_the_page_and_on_predictions(keyed):
    page = keyed.get("/")
    assert page.headers["content-security-policy"] == CSP
    assert "script-src 'self'" in CSP and "'unsafe-inline'" not in CSP
    assert '<script src="page.js">' in page.text and "<style>" not in page.text  # nothing inline for CSP to block
    answer = keyed.post("/invocations", content=JPEG, headers={"content-type": "image/jpeg", **bearer(KEY)})
    for r in (page, answer, keyed.get("/ping"), keyed.get("/stats")):
        assert r.headers["x-content-type-options"] == "nosniff"
        assert r.headers["cache-control"] == "no-store"
    assert keyed.get("/page.js").headers["content-type"].startswith("text/javascript")


def test_rate_limit_answers_429_with_retry_after(untrained_bundle):
    access = AccessSettings.for_host("127.0.0.1", [], rate_per_minute=3)
    with TestClient(create_app(untrained_bundle, SETTINGS, access=access)) as client:
        wait_ready(client)  # /ping does not count: health checks may poll
        statuses = [client.get("/stats").status_code for _ in range(4)]
        assert statuses == [200, 200, 200, 429]
        refused = client.get("/stats")
        assert refused.status_code == 429 and 1 <= int(refused.headers["retry-after"]) <= 20
        assert "at most 3 a minute" in refused.json()["error"]
        assert client.get("/ping").status_code == 200


def test_rate_limiter_refills_over_time_per_client():
    now = [0.0]
    limiter = RateLimiter(60, clock=lambda: now[0])  # one a second, bursts of 60
    assert all(limiter.wait("a") == 0 for _ in range(60))
    assert limiter.wait("a") == pytest.approx(1.0)
    assert limiter.wait("b") == 0  # another client has its own allowance
    now[0] += 2.5
    assert limiter.wait("a") == 0 and limiter.wait("a") == 0 and limiter.wait("a") > 0


def test_settings_by_address():
    with pytest.raises(CovidXrayError, match="refusing to serve on 0.0.0.0 without API keys.*--api-key-file"):
        AccessSettings.for_host("0.0.0.0", [])
    assert AccessSettings.for_host("0.0.0.0", [], allow_unauthenticated=True).rate_per_minute == 120
    assert AccessSettings.for_host("10.1.2.3", [KEY], 0).rate_per_minute is None  # 0: off
    for loopback in ("127.0.0.1", "localhost", "::1"):
        assert AccessSettings.for_host(loopback, []) == AccessSettings()


def test_keys_from_a_file_and_the_environment(tmp_path):
    keys = tmp_path / "keys.txt"
    keys.write_text(f"# ward 7\n{KEY}\n\n  {OTHER}  \n")
    assert read_keys(keys) == [KEY, OTHER]
    assert read_keys(None, f"{KEY}, {OTHER}") == [KEY, OTHER]
    weak = tmp_path / "weak.txt"
    weak.write_text("hunter2\n")
    with pytest.raises(CovidXrayError, match="API key 1 is not a usable key") as e:
        read_keys(weak)
    assert "hunter2" not in str(e.value)
    with pytest.raises(CovidXrayError, match="cannot read the API key file"):
        read_keys(tmp_path / "missing.txt")
    (tmp_path / "empty.txt").write_text("# no keys yet\n")
    with pytest.raises(CovidXrayError, match="has no keys"):
        read_keys(tmp_path / "empty.txt")


def test_serve_refuses_other_machines_without_keys(untrained_bundle, capsys, monkeypatch):
    monkeypatch.delenv(KEYS_ENV, raising=False)
    assert cli.main(["serve", str(untrained_bundle), "--host", "0.0.0.0"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "--allow-unauthenticated" in err
    assert cli.main(["serve", str(untrained_bundle), "--ssl-certfile", "cert.pem"]) == 2
    assert "both --ssl-certfile" in capsys.readouterr().err


def test_https_with_a_self_signed_certificate_and_keys(untrained_bundle, tmp_path):
    trustme = pytest.importorskip("trustme")
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1")
    cert.private_key_pem.write_to_path(tmp_path / "key.pem")
    cert.cert_chain_pems[0].write_to_path(tmp_path / "cert.pem")
    trusted = ssl.create_default_context()
    ca.configure_trust(trusted)
    process = ServeProcess(untrained_bundle, "--ssl-certfile", tmp_path / "cert.pem", "--ssl-keyfile",
                           tmp_path / "key.pem", env={KEYS_ENV: KEY}, scheme="https", verify=trusted)
    try:
        process.wait_ready()
        r = httpx.post(f"{process.url}/invocations", content=JPEG, verify=trusted,
                       headers={"content-type": "image/jpeg", **bearer(KEY)})
        assert r.status_code == 200 and r.json()["predictions"]
        assert httpx.get(f"{process.url}/stats", verify=trusted).status_code == 401
        with pytest.raises(httpx.ConnectError):  # an untrusted certificate is refused by a default client
            httpx.get(f"{process.url}/ping")
    finally:
        log = process.stop()
    assert KEY not in log


def planted_dicoms() -> dict[str, bytes]:
    """The planted patient's film, well-formed and broken in the ways a reader trips over."""
    good = dicom_bytes(patient=PATIENT)
    at = good.index(PATIENT["PatientName"].encode())
    return {"well-formed": good, "truncated pixels": good[:-10], "cut in the header": good[: at + 5],
            "broken length": good[: at - 2] + b"\xff\xff" + good[at:], "not a DICOM body": b"\0" * 128 + b"DICM" + good[at:]}


def assert_no_patient_data(*texts: str) -> None:
    for text in texts:
        for value in PATIENT.values():
            assert value not in text and value.replace("^", " ") not in text


def test_patient_data_stays_out_even_with_the_dicom_readers_debug_log(untrained_bundle, caplog, capfd):
    pydicom.config.debug(True)  # pydicom's own debug log dumps every element it parses, values included
    try:
        with caplog.at_level(logging.DEBUG), TestClient(create_app(untrained_bundle, SETTINGS)) as client:
            wait_ready(client)
            answers = [client.post("/invocations", content=body, headers={"content-type": "application/dicom"})
                       for body in planted_dicoms().values()]
            stats = client.get("/stats").text
    finally:
        pydicom.config.debug(False)
    assert answers[0].status_code == 200 and all(r.status_code == 400 for r in answers[1:]), [r.text for r in answers]
    captured = capfd.readouterr()
    assert_no_patient_data(*(r.text for r in answers), stats, caplog.text, captured.out, captured.err)


def test_patient_data_in_no_output_of_a_server_at_debug_log_level(untrained_bundle, tmp_path):
    scratch = tmp_path / "tmp"  # the server's temporary folder: uploads must never land there (or anywhere)
    scratch.mkdir()
    process = ServeProcess(untrained_bundle, "--log-level", "debug", env={"TMPDIR": str(scratch)})
    before = sorted(untrained_bundle.rglob("*"))
    big = encode(xray_like(2400, seed=6), "PNG")  # several MB: a multipart parser would spool this to disk
    try:
        process.wait_ready()
        with httpx.Client(base_url=process.url, timeout=60) as client:
            answers = [client.post("/invocations", content=body, headers={"content-type": "application/dicom"}).text
                       for body in planted_dicoms().values()]
            answers.append(client.get("/stats").text)
            assert client.post("/invocations", content=big, headers={"content-type": "image/png"}).status_code == 200
    finally:
        log = process.stop()
    assert "predictions" in answers[0] and "POST /invocations" in log  # it did answer, and it did log
    assert_no_patient_data(*answers, log)
    assert json.loads(answers[1])["error"].startswith("corrupt DICOM file")
    assert not list(scratch.iterdir()) and sorted(untrained_bundle.rglob("*")) == before  # nothing written
