"""Who may use the endpoint, and how often: API keys (`Authorization: Bearer KEY`), a per-client request
rate limit, and the security headers on every response.

`AccessControl` is an ASGI middleware in front of the app, so a refused request costs neither a body read
nor a route. `GET /ping` (health checks) and the page's own static files (no data in them) stay open;
everything that returns predictions, statistics or settings needs a key once keys are configured. Keys
are held only as SHA-256 digests and compared in constant time; a refused attempt is logged with its
route, client address and reason, never with what was sent.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import logging
import math
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path

from .errors import CovidXrayError
from .protocol import encode_json, error_document

log = logging.getLogger("covid_xray.access")

KEYS_ENV = "COVID_XRAY_API_KEYS"  # keys separated by commas or whitespace, instead of --api-key-file
MIN_KEY_LENGTH = 16
# What an HTTP header can carry as a Bearer token (RFC 6750 b64token), so a valid key can always be sent.
KEY_FORM = re.compile(r"[A-Za-z0-9\-._~+/]+=*")
# Open without a key: the health check, and the page's static files, which hold no data.
PUBLIC = {"/ping", "/", "/page.js", "/page.css"}
# Requests a client may make per minute when the server listens beyond loopback and no --rate-limit is given.
DEFAULT_RATE_PER_MINUTE = 120
TRACKED_CLIENTS = 10_000  # beyond this, clients whose allowance is full again are forgotten

# The page loads only its own script and style; images come from the files the user picks (blob:)
# and the heatmaps in responses (data:); it talks only to this server and cannot be framed.
CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' blob: data:; connect-src 'self'; "
       "base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
HEADERS = [
    (b"content-security-policy", CSP.encode()),
    (b"x-content-type-options", b"nosniff"),
    (b"x-frame-options", b"DENY"),
    (b"referrer-policy", b"no-referrer"),
    # Predictions and statistics are about patients: no browser or proxy may keep a copy.
    (b"cache-control", b"no-store"),
]


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def read_keys(path: str | os.PathLike | None, env: str | None = None) -> list[str]:
    """The keys in `path` (one a line; blank lines and lines starting with # ignored) and in `env`
    (separated by commas or whitespace). Raises CovidXrayError on a missing file or a weak key."""
    keys = [k for k in re.split(r"[,\s]+", env or "") if k]
    if path is not None:
        try:
            lines = Path(path).read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as e:
            raise CovidXrayError(f"cannot read the API key file {path}: {getattr(e, 'strerror', None) or e}") from None
        keys += [line.strip() for line in lines if line.strip() and not line.strip().startswith("#")]
        if not keys:
            raise CovidXrayError(f"the API key file {path} has no keys: put one key on each line")
    for i, key in enumerate(keys, 1):  # the key itself is never echoed: error messages end up in logs
        if len(key) < MIN_KEY_LENGTH or not KEY_FORM.fullmatch(key):
            raise CovidXrayError(
                f"API key {i} is not a usable key: use at least {MIN_KEY_LENGTH} characters of letters, digits "
                f"and -._~+/ (make one with: python -c 'import secrets; print(secrets.token_urlsafe(32))')")
    return keys


@dataclass(frozen=True)
class AccessSettings:
    key_digests: tuple[str, ...] = ()  # SHA-256 of each accepted key; empty: no authentication
    rate_per_minute: float | None = None  # per client address; None: no limit

    @classmethod
    def for_host(cls, host: str, keys: list[str], rate_per_minute: float | None = None, *,
                 allow_unauthenticated: bool = False) -> AccessSettings:
        """The settings `serve` uses on `host`. Beyond loopback, keys are required (unless deliberately
        waived) and the rate limit defaults to DEFAULT_RATE_PER_MINUTE; `rate_per_minute=0` turns it off."""
        loopback = is_loopback(host)
        if not keys and not loopback and not allow_unauthenticated:
            raise CovidXrayError(
                f"refusing to serve on {host} without API keys: anyone who can reach the port could send X-rays and "
                f"read predictions. Add --api-key-file FILE (one key per line) or set {KEYS_ENV}, or pass "
                f"--allow-unauthenticated to serve without keys deliberately")
        if rate_per_minute is None and not loopback:
            rate_per_minute = DEFAULT_RATE_PER_MINUTE
        if rate_per_minute is not None and rate_per_minute < 0:
            raise CovidXrayError("--rate-limit must be 0 (off) or a number of requests per minute")
        return cls(tuple(digest(k) for k in keys), rate_per_minute or None)


class RateLimiter:
    """A token bucket per client: `per_minute` requests a minute, in bursts of up to as many."""

    def __init__(self, per_minute: float, clock=time.monotonic):
        self.capacity, self.rate, self.clock = per_minute, per_minute / 60, clock
        self._buckets: dict[str, tuple[float, float]] = {}  # client → (tokens, when counted)

    def wait(self, client: str) -> float:
        """0 if `client` may make a request now (and count it), else the seconds until it may."""
        now = self.clock()
        tokens, then = self._buckets.get(client, (self.capacity, now))
        tokens = min(self.capacity, tokens + (now - then) * self.rate)
        if tokens < 1:
            self._buckets[client] = (tokens, now)
            return (1 - tokens) / self.rate
        self._buckets[client] = (tokens - 1, now)
        if len(self._buckets) > TRACKED_CLIENTS:
            self._forget_idle(now)
        return 0.0

    def _forget_idle(self, now: float) -> None:
        full = [c for c, (tokens, then) in self._buckets.items() if tokens + (now - then) * self.rate >= self.capacity]
        for client in full:
            del self._buckets[client]


class AccessControl:
    """ASGI middleware: rate limit, then API key, then the app; security headers on every response."""

    def __init__(self, app, settings: AccessSettings):
        self.app, self.settings = app, settings
        self.digests = list(settings.key_digests)
        self.limiter = RateLimiter(settings.rate_per_minute) if settings.rate_per_minute else None

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def send_with_headers(message) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), *HEADERS]}
            await send(message)

        path, method = scope["path"], scope["method"]
        client = scope["client"][0] if scope.get("client") else "unknown"
        if self.limiter and path != "/ping":
            wait = self.limiter.wait(client)
            if wait:
                log.warning("rate limit: refused %s %s from %s", method, path, client)
                return await _refuse(send_with_headers, 429, f"too many requests: at most "
                                     f"{self.settings.rate_per_minute:g} a minute from one client; retry later",
                                     [(b"retry-after", str(math.ceil(wait)).encode())])
        if self.digests and not (method in ("GET", "HEAD") and path in PUBLIC):
            problem = self._check_key(scope)
            if problem:
                log.warning("refused %s %s from %s: %s", method, path, client, problem)
                challenge = 'Bearer realm="covid-xray"' + ("" if problem == "no API key" else ', error="invalid_token"')
                return await _refuse(send_with_headers, 401, f"{problem}: send the header 'Authorization: Bearer "
                                     f"<API key>' (the server's operator gives out keys)",
                                     [(b"www-authenticate", challenge.encode())])
        await self.app(scope, receive, send_with_headers)

    def _check_key(self, scope) -> str | None:
        """None when the request carries an accepted key, else what is wrong (never the key itself)."""
        values = [v for k, v in scope["headers"] if k == b"authorization"]
        if not values:
            return "no API key"
        scheme, _, token = values[0].decode("latin-1").strip().partition(" ")
        token = token.strip()
        if len(values) > 1 or scheme.lower() != "bearer" or not KEY_FORM.fullmatch(token):
            return "malformed Authorization header"
        presented = digest(token)
        # Compare against every key, so the time taken does not tell which (or whether an early) one matched.
        matched = [hmac.compare_digest(presented, d) for d in self.digests]
        return None if any(matched) else "wrong API key"


async def _refuse(send, status: int, message: str, headers: list[tuple[bytes, bytes]]) -> None:
    body = encode_json(error_document(message))
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            *headers]})
    await send({"type": "http.response.body", "body": body})
