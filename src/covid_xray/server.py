"""The HTTP endpoint: SageMaker's `/ping` and `/invocations`, a `/stats` probe, and the web page.

One model instance per process sits behind a `Batcher` (`batcher.py`): a bounded queue drained by
inference threads, which group concurrent requests into micro-batches. Requests are decoded in a small
thread pool while the model runs, so decoding and inference overlap. Everything a client can
send wrong becomes a JSON error with a 4xx status (`protocol.RequestError`); nothing a client
sends can stop the server, and tracebacks go to the log, never to the client. Heatmaps
(`?heatmap=true`) are computed after the prediction, on a thread and a model copy of their own.
"""

from __future__ import annotations

import asyncio
import copy
import json
import logging
import os
import socket
import threading
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import asdict, dataclass, replace
from functools import partial
from importlib.resources import files
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect
from threadpoolctl import threadpool_limits

from . import protocol
from .access import AccessControl, AccessSettings
from .batcher import Batcher
from .errors import ModelError
from .protocol import RequestError
from .site_shift import Reference, RollingCheck
from .util import cpu_count, parse_bool

if TYPE_CHECKING:
    from .inference import Predictor
    from .models import XrayNet

log = logging.getLogger("covid_xray.server")
SETTINGS_ENV = "COVID_XRAY_SERVE"  # how `serve --workers N` hands settings to each worker process


@dataclass(frozen=True)
class ServerSettings:
    max_batch_size: int = 8
    max_wait_ms: float = 5.0  # longest a batch waits for requests that are still being decoded
    queue_size: int = 64  # requests decoding + images waiting, beyond which requests get 503
    max_body_bytes: int = protocol.DEFAULT_MAX_BODY_BYTES
    max_instances: int = protocol.DEFAULT_MAX_INSTANCES
    decode_threads: int = max(2, cpu_count())
    # Threads that run the (one, shared) model on batches. On CPU a small CNN gains little from
    # batching or from intra-op threads, but two single-threaded forward passes use two cores fully.
    inference_threads: int = min(2, cpu_count())
    # Intra-op threads per inference thread (PyTorch and ONNX Runtime); None: PyTorch keeps its setting
    # and ONNX Runtime uses every usable core.
    model_threads: int | None = None

    def __post_init__(self) -> None:
        for name in ("max_batch_size", "queue_size", "max_body_bytes", "max_instances", "decode_threads",
                     "inference_threads", "model_threads"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1")
        if self.max_wait_ms < 0:
            raise ValueError("max_wait_ms must be >= 0")

    def for_processes(self, workers: int, inference_threads: int | None = None) -> ServerSettings:
        """Share the cores among `workers` processes: inference threads (unless given) and model
        threads (unless set) are sized so that all model threads together use each core once."""
        if workers < 1:
            raise ValueError("workers must be at least 1")
        threads = inference_threads or max(1, min(2, cpu_count() // workers))
        model_threads = self.model_threads or max(1, cpu_count() // (workers * threads))
        return replace(self, inference_threads=threads, model_threads=model_threads)


class ModelState:
    """The loaded model, or why there is none yet: `/ping` reports it, `/invocations` needs it."""

    def __init__(self) -> None:
        self.predictor: Predictor | None = None
        self.batcher: Batcher | None = None
        self.identity: dict[str, Any] | None = None
        self.site: RollingCheck | None = None  # recent films against the training data (None: no reference)
        self.error: str | None = None
        self._explain_model: XrayNet | None = None  # touched only by the one explain thread

    @property
    def ready(self) -> bool:
        return self.batcher is not None

    def load(self, bundle: Path, settings: ServerSettings) -> None:
        from .inference import Predictor

        try:
            _set_torch_threads(settings.model_threads)
            # The server's own numpy work (the OOD guard's small matrix products) is a fraction of a
            # millisecond; BLAS worker threads would only spin against the model for the cores.
            threadpool_limits(1, user_api="blas")
            # ONNX Runtime's intra-op pool belongs to the session, which the inference threads share.
            threads = settings.model_threads and settings.model_threads * settings.inference_threads
            predictor = Predictor.from_bundle(bundle, threads=threads)
            # Warm up both shapes we will see most, so the first clients do not pay for setup.
            for n in sorted({1, settings.max_batch_size}):
                predictor.score(np.zeros((n, predictor.size, predictor.size), np.uint8))
        except Exception as e:
            self.error = f"{type(e).__name__}: {e}" if not isinstance(e, protocol.CovidXrayError) else str(e)
            log.error("cannot load model bundle %s: %s", bundle, self.error)
            return
        self.predictor, self.identity = predictor, protocol.model_identity(predictor)
        reference = predictor.config.site_reference
        self.site = RollingCheck(Reference.from_dict(reference)) if reference else None
        self.batcher = Batcher(
            predictor.score, max_batch_size=settings.max_batch_size,
            max_wait_s=settings.max_wait_ms / 1000, queue_size=settings.queue_size,
            threads=settings.inference_threads, initializer=partial(_set_torch_threads, settings.model_threads),
        ).start()
        log.info("model ready: %s (%s)", self.identity["backbone"], self.identity["fingerprint"])

    def heatmaps(self, images: np.ndarray, class_indices: np.ndarray) -> list[str]:
        """Grad-CAM of each image for its class, as base64 PNGs. Runs on the one explain thread."""
        from .explain import gradcam, heatmap_png_b64

        if self._explain_model is None:
            # Grad-CAM hooks the model it explains, and those hooks would also catch the batcher's
            # forward passes: with the torch backend (the batcher runs this very model) it gets a copy.
            model = self.predictor.model
            self._explain_model = copy.deepcopy(model) if self.predictor.onnx is None else model
        return [heatmap_png_b64(gradcam(self._explain_model, image, int(c)))
                for image, c in zip(images, class_indices)]

    def close(self) -> None:
        if self.batcher is not None:
            self.batcher.close()


def _set_torch_threads(n: int | None) -> None:
    # Called in each thread that runs the model: with OpenMP the thread count is per thread.
    if n is not None:
        import torch

        torch.set_num_threads(n)


def _json(document: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(protocol.encode_json(document), status_code=status, media_type=protocol.JSON, headers=headers)


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> Response:
    return _json(protocol.error_document(message), status, headers)


def _static(name: str) -> str:
    return files("covid_xray").joinpath("static", name).read_text(encoding="utf-8")


def _wants_heatmap(request: Request) -> bool:
    """`?heatmap=true` or `X-Heatmap: true` (also 1, yes, false, 0, no); any other value is a 400."""
    wanted = False
    for source, value in (("query parameter heatmap", request.query_params.get("heatmap")),
                          ("header X-Heatmap", request.headers.get("x-heatmap"))):
        if value is not None:
            flag = parse_bool(value)
            if flag is None:
                raise RequestError(400, f"{source} must be true or false, not {value!r}")
            wanted |= flag
    return wanted


async def _read_body(request: Request, limit: int) -> bytes:
    """The body, refused (413) as soon as it is known to exceed `limit` — before it is all read."""
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.isdigit():
            raise RequestError(400, "invalid Content-Length header")
        protocol.check_size(int(declared), limit)
    body = bytearray()
    try:
        async for chunk in request.stream():
            body += chunk
            if len(body) > limit:
                raise RequestError(413, f"request body exceeds the limit of {limit:,} bytes")
    except ClientDisconnect:  # nobody is left to answer; keep it out of the error log
        raise RequestError(400, "the client disconnected before sending the whole body") from None
    return bytes(body)


def create_app(bundle_path: str | os.PathLike, settings: ServerSettings | None = None, *,
               access: AccessSettings | None = None, load_in_background: bool = True) -> FastAPI:
    """The endpoint for one bundle. By default the model loads in the background when the app
    starts, so `/ping` answers 503 ("loading") at once and 200 when predictions are possible.
    With `load_in_background=False` the app accepts no connection before the model is ready.
    `access`: API keys and rate limit (default: neither); the security headers are always sent."""
    settings = settings or ServerSettings()
    bundle = Path(bundle_path)
    state = ModelState()
    decode_pool = ThreadPoolExecutor(settings.decode_threads, thread_name_prefix="covid-xray-decode")
    # One thread computes heatmaps, so the model Grad-CAM hooks is never used by two threads at once.
    explain_pool = ThreadPoolExecutor(1, thread_name_prefix="covid-xray-explain",
                                      initializer=partial(_set_torch_threads, settings.model_threads))

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        if load_in_background:
            threading.Thread(target=state.load, args=(bundle, settings), name="covid-xray-load", daemon=True).start()
        else:
            await asyncio.to_thread(state.load, bundle, settings)
        try:
            yield
        finally:
            state.close()
            decode_pool.shutdown(wait=False, cancel_futures=True)
            explain_pool.shutdown(wait=False, cancel_futures=True)

    app = FastAPI(title="covid-xray", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)
    app.add_middleware(AccessControl, settings=access or AccessSettings())
    app.state.model = state
    app.state.settings = settings
    page, script, style = (_static(name) for name in ("index.html", "page.js", "page.css"))

    @app.exception_handler(RequestError)
    async def request_error(request: Request, exc: RequestError) -> Response:
        return _error(exc.status, str(exc))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> Response:
        return _error(exc.status_code, str(exc.detail), getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> Response:
        log.error("unexpected error on %s %s", request.method, request.url.path, exc_info=exc)
        return _error(500, "internal server error; the details are in the server log")

    @app.get("/", response_class=HTMLResponse)
    async def index() -> HTMLResponse:
        return HTMLResponse(page)

    @app.get("/page.js")
    async def page_script() -> Response:
        return Response(script, media_type="text/javascript")

    @app.get("/page.css")
    async def page_style() -> Response:
        return Response(style, media_type="text/css")

    @app.get("/ping")
    async def ping() -> Response:
        if state.ready:
            return _json({"status": "ready", "model": state.identity})
        if state.error:
            return _json({"status": "failed", "error": state.error}, 503)
        return _json({"status": "loading"}, 503)

    @app.get("/stats")
    async def stats() -> Response:
        batcher = state.batcher.stats() if state.batcher else None
        # With several worker processes each reports its own window: the films it answered.
        site = state.site.check().to_dict() if state.site else None
        return _json({"ready": state.ready, "batcher": batcher, "site": site, "settings": asdict(settings)})

    @app.post("/invocations")
    async def invocations(request: Request) -> Response:
        protocol.negotiate(request.headers.get("accept"))
        heatmap = _wants_heatmap(request)
        if not state.ready:
            raise RequestError(503, "model is still loading; poll GET /ping until it answers 200")
        content_type = request.headers.get("content-type")
        protocol.check_content_type(content_type)  # refuse a wrong type (415) before reading the body
        body = await _read_body(request, settings.max_body_bytes)
        loop = asyncio.get_running_loop()
        with state.batcher.admit():
            images = await loop.run_in_executor(decode_pool, _decode, body, content_type)
            futures = state.batcher.submit(images)
        scores = await asyncio.gather(*(asyncio.wrap_future(f) for f in futures))
        document = protocol.build_response(state.predictor, scores, state.identity)
        if state.site:
            state.site.add(document["predictions"])
        if heatmap:
            classes = [int(np.argmax(s.probabilities)) for s in scores]
            try:
                pngs = await loop.run_in_executor(explain_pool, state.heatmaps, images, classes)
            except ModelError as e:  # a backbone Grad-CAM cannot explain: the predictions still stand
                pngs = [None] * len(scores)
                document["heatmap_error"] = str(e)
            for prediction, png in zip(document["predictions"], pngs):
                prediction["heatmap"] = png
        return _json(document)

    def _decode(body: bytes, content_type: str | None) -> np.ndarray:
        payloads = protocol.decode_request(
            body, content_type, max_bytes=settings.max_body_bytes, max_instances=settings.max_instances
        )
        return protocol.preprocess(state.predictor, payloads)

    return app


def app_from_env() -> FastAPI:
    """Factory for `uvicorn --factory` in each worker process of `serve --workers N`.

    Workers share one listening socket, so a worker still loading its model must not take
    connections (it would answer 503 while its siblings are ready): each loads before serving."""
    spec = json.loads(os.environ[SETTINGS_ENV])
    access = AccessSettings(tuple(spec["access"]["key_digests"]), spec["access"]["rate_per_minute"])
    return create_app(spec["bundle"], ServerSettings(**spec["settings"]), access=access, load_in_background=False)


def bind_listener(config) -> socket.socket:
    """The listening socket `serve --workers N` shares among its workers, with Nagle off.

    uvicorn binds it with proto 0, so asyncio does not turn Nagle off for the connections it accepts
    (uvicorn issue #3149): every keep-alive request after the first then waited ~40 ms for a delayed
    ACK. Accepted sockets inherit TCP_NODELAY from the listener."""
    sock = config.bind_socket()
    if sock.family in (socket.AF_INET, socket.AF_INET6):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def serve(bundle: str | os.PathLike, *, host: str = "127.0.0.1", port: int = 8080, workers: int = 1,
          settings: ServerSettings | None = None, access: AccessSettings | None = None, log_level: str = "info",
          ssl_certfile: str | None = None, ssl_keyfile: str | None = None) -> None:
    """Run the endpoint under uvicorn until interrupted; HTTPS with a certificate and its key."""
    import uvicorn

    settings = settings or ServerSettings().for_processes(workers)
    access = access or AccessSettings()
    tls = {"ssl_certfile": ssl_certfile, "ssl_keyfile": ssl_keyfile}
    if workers > 1:
        from uvicorn.supervisors import Multiprocess

        os.environ[SETTINGS_ENV] = json.dumps({"bundle": str(Path(bundle).resolve()), "settings": asdict(settings),
                                               "access": asdict(access)})
        config = uvicorn.Config("covid_xray.server:app_from_env", factory=True, host=host, port=port,
                                workers=workers, log_level=log_level, **tls)
        try:
            Multiprocess(config, sockets=[bind_listener(config)]).run()
        except KeyboardInterrupt:
            pass
    else:
        uvicorn.run(create_app(bundle, settings, access=access), host=host, port=port, log_level=log_level, **tls)
