"""The HTTP service: FastAPI over one loaded model bundle.

``POST /v1/predict``   multipart ``file`` (PNG, JPEG, TIFF or DICOM) -> probabilities, positive
                       findings at the bundle's thresholds, and with ``?cam=FINDING`` (or
                       ``cam=top``) the uploaded image and its Grad-CAM overlay (at the image's own
                       resolution up to 2,048 px a side, scaled down beyond: ``OVERLAY_MAX_SIDE``;
                       finding, probability, threshold and colour scale written on it) as base64 PNGs
``GET /v1/model``      the bundle's metadata (findings, thresholds, image size, metrics, versions)
``GET /healthz``       liveness
``GET /``              a web page: drop an X-ray, see the 14 probabilities and the heatmap

Bad input is the client's fault and is answered 4xx with a message naming
what is wrong, never 500: an upload over the size limit (413: from its
Content-Length when it has one, else counted while it streams), an upload
not complete within the time limit (408), an image whose decoded pixels would
exceed the budget (413, from its header: :data:`cxrlearn.data.decoding.images.MAX_DECODED_BYTES`),
an empty or undecodable file or a DICOM without pixels (422), a file name
with path separators (400).

Memory is bounded: a request body is read into memory only up to the limit;
at most ``decoders`` images are decoded (and made ready for the network) at once,
each within the pixel budget, in FastAPI's thread pool; the network runs in one
thread, on batches of the requests that arrived within ``batch_wait_ms`` of each
other, at most ``max_batch`` of them (:mod:`cxrlearn.serving.batching`), and a
request that fails frees its place like any other. Connections are bounded by :class:`GuardedH11`.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hmac
import io
import json
import logging
import os
import re
import threading
import time
import uuid
from importlib import resources
from pathlib import Path

import numpy as np
from fastapi import FastAPI, File, HTTPException, Query, Request, UploadFile
from fastapi.responses import HTMLResponse, Response
from PIL import Image
from uvicorn.protocols.http.h11_impl import H11Protocol

from cxrlearn.data.decoding.images import decode_grayscale_and_colour
from cxrlearn.defaults import usable_cores, whole_number
from cxrlearn._files import first_line
from cxrlearn.errors import ConfigError, DataError, ImageTooLarge
from cxrlearn.inference.gradcam import annotated_overlay, heatmaps
from cxrlearn.inference.predictor import Prediction, Predictor, Prepared
from cxrlearn.monitoring.log import Answered, PredictionLog
from cxrlearn.serving import (BATCH_WAIT_MS, HEADER_TIMEOUT_S, HEALTH_FACTOR, HOST, MAX_BATCH, MAX_CONNECTIONS,
                              MAX_PER_CLIENT, MAX_UPLOAD_BYTES, OVERLAY_MAX_SIDE, PORT, UPLOAD_TIMEOUT_S)
from cxrlearn.serving.batching import Batcher
from cxrlearn.serving.metrics import ServiceMetrics

log = logging.getLogger(__name__)
#: The key of a request's scope["state"] that says it came on a connection beyond the limit (health checks only).
OVERFLOW = "cxrlearn_overflow"


def _png_base64(rgb_or_gray: np.ndarray) -> str:
    buffer = io.BytesIO()
    Image.fromarray(rgb_or_gray).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def _check_name(name: str | None) -> str:
    name = name or "upload"
    if "/" in name or "\\" in name or name in (".", "..") or "\x00" in name:
        raise HTTPException(400, f"file name {name!r} must be a plain name, without path separators")
    return name


def _decode(data: bytes, name: str, slots: threading.BoundedSemaphore, predictor: Predictor
            ) -> tuple[np.ndarray, Prepared]:
    """Decoded grayscale pixels of an upload, and the image made ready for the network; every failure is the
    upload's and becomes a 4xx.

    Images whose decoded pixels would exceed the budget are refused from their headers (413), before any
    pixel is decoded; at most as many decodes as ``slots`` allows run at once (the colour spread's
    thumbnail and the resizing to the network's input among them, outside the network's batches).
    """

    if not data:
        raise HTTPException(422, f"{name}: the upload is empty")
    try:
        with slots:
            decoded = decode_grayscale_and_colour(data, name, predictor.preprocessing.cache_size)
            return decoded.pixels, predictor.prepare(*decoded)
    except ImageTooLarge as err:
        raise HTTPException(413, str(err)) from None
    except DataError as err:
        raise HTTPException(422, str(err)) from None


def _within(pixels: np.ndarray, side: int) -> np.ndarray:
    """``pixels`` scaled down (area averaging) so that neither side exceeds ``side``; itself when it fits."""
    height, width = pixels.shape[:2]
    if max(height, width) <= side:
        return pixels
    scale = side / max(height, width)
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    return np.asarray(Image.fromarray(pixels).resize(size, Image.Resampling.BOX))


async def _send_json(send, status: int, detail: str, headers: tuple = ()) -> None:
    body = json.dumps({"detail": detail}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            (b"connection", b"close"), *headers]})
    await send({"type": "http.response.body", "body": body})


#: What a client's ``X-Request-ID`` may be to be echoed: letters, digits and ``-_.:``, at most 128 of them.
_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")


def read_api_key(path: str | os.PathLike) -> str:
    """The key in ``path`` (its first line), refused by name when the file is missing, empty, too short, or holds
    characters other than printable ASCII (an HTTP header carries bytes, and a browser sends only Latin-1: a key
    of other characters could never be sent as it is written, and would lock everyone out)."""
    key = first_line(path, "API key file", ConfigError)
    if len(key) < 16:
        raise ConfigError(f"--api-key-file {path}: the key must be at least 16 characters on its first line")
    if not all(" " < c <= "~" for c in key):
        raise ConfigError(f"--api-key-file {path}: the key may hold only printable ASCII characters (letters, digits, "
                          "punctuation), no spaces or other characters")
    return key


#: What needs the key when the service has one: the API, and its description (the page and /healthz stay open).
KEYED_PATHS = ("/v1/", "/docs", "/redoc", "/openapi.json", "/metrics")


class Traced:
    """ASGI middleware: every response carries ``X-Request-ID`` (the client's, when it sent a usable one, else a
    new one) and every request is logged once with it; with ``api_key``, ``/v1/`` answers 401 unless the request
    carries the key (``Authorization: Bearer KEY`` or ``X-API-Key: KEY``), and so do ``/docs`` and
    ``/openapi.json`` and ``/metrics`` (:data:`KEYED_PATHS`). The page and ``/healthz`` stay open,
    so that a browser can load the page and ask for the key, and a load balancer can check liveness. With
    ``metrics``, every request is counted there (:class:`~cxrlearn.serving.metrics.ServiceMetrics`)."""

    def __init__(self, app, api_key: str | None = None, metrics: ServiceMetrics | None = None):
        self.app, self.api_key, self.metrics = app, api_key, metrics

    def _authorised(self, headers: dict) -> bool:
        """The key compared as the bytes it travels as (UTF-8 of the key file's text)."""
        given = headers.get(b"x-api-key", b"")
        bearer = headers.get(b"authorization", b"")
        if bearer[:7].lower() == b"bearer ":
            given = given or bearer[7:].strip()
        return hmac.compare_digest(given, self.api_key.encode("utf-8"))

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        asked = headers.get(b"x-request-id", b"").decode("latin-1")
        request_id = asked if _REQUEST_ID.fullmatch(asked) else uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = request_id
        status, started = 500, time.perf_counter()

        async def traced(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message = {**message, "headers": [*message.get("headers", []),
                                                  (b"x-request-id", request_id.encode("latin-1"))]}
            await send(message)

        try:
            if scope["state"].get(OVERFLOW) and scope["path"] != "/healthz":
                return await _send_json(traced, 503, "the service is at its connection limit; try again shortly")
            if self.api_key and scope["path"].startswith(KEYED_PATHS) and not self._authorised(headers):
                return await _send_json(traced, 401, "this service needs its API key: send it as "
                                                     "'Authorization: Bearer KEY' or 'X-API-Key: KEY'",
                                        ((b"www-authenticate", b"Bearer"),))
            return await self.app(scope, receive, traced)
        finally:
            client, seconds = scope.get("client") or ("?", 0), time.perf_counter() - started
            log.info(f"request {request_id} from {client[0]}: {scope['method']} {scope['path']} {status} "
                     f"{1000 * seconds:.0f} ms")
            if self.metrics is not None:
                self.metrics.request(scope["path"], status, seconds)


class BoundedBodies:
    """ASGI middleware: a request body is read whole, into memory, before the app sees it — refused (413)
    as soon as it passes ``max_bytes`` whatever its headers say, and (408) when it is not complete within
    ``timeout_s`` — so neither a chunked upload of unknown length nor a stalled one can hold disk or a
    connection for long."""

    def __init__(self, app, max_bytes: int, timeout_s: float):
        self.app, self.max_bytes, self.timeout_s = app, max_bytes, timeout_s

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "OPTIONS"):
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        length = headers.get(b"content-length", b"").decode("latin-1")
        if (whole_number(length) or 0) > self.max_bytes:
            return await _send_json(send, 413, f"upload of {int(length):,} bytes is over the limit of "
                                               f"{self.max_bytes:,} bytes")
        chunks, size = [], 0
        try:
            async with asyncio.timeout(self.timeout_s):
                while True:
                    message = await receive()
                    if message["type"] == "http.disconnect":
                        return None
                    chunk = message.get("body", b"")
                    size += len(chunk)
                    if size > self.max_bytes:
                        return await _send_json(send, 413, f"upload over the limit of {self.max_bytes:,} bytes")
                    chunks.append(chunk)
                    if not message.get("more_body", False):
                        break
        except TimeoutError:
            return await _send_json(send, 408, f"upload not complete within {self.timeout_s:g} s")
        body, delivered = b"".join(chunks), False

        async def replay():
            nonlocal delivered
            if not delivered:
                delivered = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        return await self.app(scope, replay, send)


class GuardedH11(H11Protocol):
    """uvicorn's HTTP/1.1 protocol with three guards against connections that send nothing (or unfinished headers)
    and so held every slot, answering /healthz and every client 503 for as long as they stayed open, or, reopened
    as they closed, for as long as an attacker liked:

    * a connection whose request headers are not whole ``header_timeout`` seconds after it opened (or after its
      last response) is closed; the body has its own limit (:class:`BoundedBodies`);
    * one client address may hold at most ``max_per_client`` connections; one more is closed at once, so a single
      client cannot fill the service however fast it reconnects;
    * ``max_connections`` connections are served; beyond them, up to :data:`HEALTH_FACTOR` times as many more may
      only ask ``/healthz`` (:class:`Traced` answers them 503 otherwise), and a connection beyond those is closed
      at once. uvicorn's own limit (which answered every request 503, ``/healthz`` too, once its count of
      connections was reached) is not used."""

    header_timeout: float = HEADER_TIMEOUT_S
    max_connections: int = MAX_CONNECTIONS
    max_per_client: int = MAX_PER_CLIENT

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self._header_timer = None
        # Connections already closed (a refused one stays in the set until the loop reports it lost) do not count.
        live = [other for other in self.connections if not other.transport.is_closing()]
        host = self.client[0] if self.client else None
        same = sum(1 for other in live if other.client and other.client[0] == host)
        if same > self.max_per_client or len(live) > self.max_connections * (1 + HEALTH_FACTOR):
            transport.close()
            return
        overflow = len(live) > self.max_connections
        self.app_state = {**self.app_state, OVERFLOW: overflow}  # each request's scope["state"] copies it
        self._arm()

    def _arm(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
        self._header_timer = self.loop.call_later(self.header_timeout, self._headers_too_slow)

    def _headers_too_slow(self) -> None:
        waiting = self.cycle is None or self.cycle.response_complete  # no request under way: none came whole
        if waiting and not self.transport.is_closing():
            self.transport.close()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._arm()

    def connection_lost(self, exc) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
        super().connection_lost(exc)


def server_config(app, host: str = HOST, port: int = PORT, max_connections: int = MAX_CONNECTIONS,
                  header_timeout_s: float = HEADER_TIMEOUT_S, log_level: str = "info",
                  max_per_client: int = MAX_PER_CLIENT):
    """The uvicorn configuration ``serve`` runs ``app`` with (:class:`GuardedH11`); tests start the same."""
    import uvicorn

    protocol = type("GuardedH11", (GuardedH11,), {"header_timeout": header_timeout_s,
                                                  "max_connections": max_connections,
                                                  "max_per_client": max_per_client})
    # Each request is logged once by Traced, with its request id; uvicorn's own access line would lack it.
    return uvicorn.Config(app, host=host, port=port, log_level=log_level, http=protocol, limit_concurrency=None,
                          timeout_keep_alive=5, access_log=False)


def _answer(predictor: Predictor, result: Prediction, request_id: str) -> dict:
    """The JSON answer to ``POST /v1/predict`` (without the heatmap)."""
    return {
        "image": result.image,
        "probabilities": result.probabilities,
        "positive_findings": result.positive,
        "not_called": list(result.not_called),  # no threshold established: a probability and no call
        "thresholds": predictor.thresholds or None,
        "threshold_method": predictor.meta.threshold_method,
        "input_check": result.input_check,
        "input_score": result.input_score,
        **predictor.provenance.columns(),
        "request_id": request_id,
    }


def default_decoders() -> int:
    """Images decoded at once: one per core, at most 4 (each may take up to the pixel budget, several times over)."""
    return max(1, min(4, usable_cores()))


def _record(prediction_log: PredictionLog, result: Prediction, request_id: str, predictor: Predictor) -> None:
    """An answer into the prediction log before it is sent: one that cannot be recorded is withheld (503)."""
    try:
        prediction_log.record([Answered(result, request_id)], predictor, "serve")
    except ConfigError as err:
        log.error(str(err))
        raise HTTPException(503, "the prediction log cannot be written; the answer is withheld") from None


def _add_open_routes(app: FastAPI, page: str, metrics: ServiceMetrics) -> None:
    """The routes beside the model's: liveness, the metrics operators scrape, and the page."""

    @app.api_route("/healthz", methods=["GET", "HEAD"])
    def healthz() -> dict:
        return {"status": "ok"}

    @app.get("/metrics", response_class=Response)
    def prometheus_metrics() -> Response:
        content, media_type = metrics.exposition()
        return Response(content, media_type=media_type)

    @app.get("/", response_class=HTMLResponse)
    def index() -> str:
        return page


def create_app(model_dir: str | os.PathLike, runtime: str = "torch", max_upload_bytes: int = MAX_UPLOAD_BYTES,
               decoders: int | None = None, upload_timeout_s: float = UPLOAD_TIMEOUT_S, strict: bool = False,
               device: str = "auto", api_key: str | None = None, max_batch: int = MAX_BATCH,
               batch_wait_ms: float = BATCH_WAIT_MS, prediction_log: PredictionLog | None = None) -> FastAPI:
    """The service. ``strict``: refuse (422, naming the reason) an input the input check flags, rather than
    answer it with ``input_check: "warning: ..."``. ``device``: where the torch model runs (``auto``: a CUDA
    GPU when there is one). ``api_key``: required on ``/v1/`` (:class:`Traced`). ``max_batch``, ``batch_wait_ms``:
    requests share forward passes of at most ``max_batch`` images, waiting at most ``batch_wait_ms`` for company
    (:class:`~cxrlearn.serving.batching.Batcher`; 1 and 0: one request per pass, as before batching).
    ``prediction_log``: every answer (and ``strict``'s refusals) recorded there before it is sent (:func:`_record`)."""
    predictor = Predictor(model_dir, runtime=runtime, device=device)
    predictor.with_gradients()  # Grad-CAM's torch model, loaded before the first request
    predictor.summarise = prediction_log is not None
    log.info(f"serving {model_dir}: {predictor.provenance.text()}; "
             + ("an API key is required on /v1/, /docs and /openapi.json" if api_key else "no API key is required"))
    metrics = ServiceMetrics(predictor.findings)
    batcher = Batcher(predictor, max_batch, batch_wait_ms / 1000, observe=metrics.batch)
    slots = threading.BoundedSemaphore(decoders or default_decoders())

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI):
        yield
        batcher.close()

    app = FastAPI(title="cxrlearn", description="Chest X-ray findings (NIH ChestX-ray14)", version="1",
                  lifespan=lifespan)
    page = resources.files("cxrlearn.serving").joinpath("page.html").read_text(encoding="utf-8")
    # Room for the multipart framing around the file itself.
    app.add_middleware(BoundedBodies, max_bytes=max_upload_bytes + 64 * 1024, timeout_s=upload_timeout_s)
    app.add_middleware(Traced, api_key=api_key, metrics=metrics)  # added last, so it runs first: 401s and 413s carry the id too

    _add_open_routes(app, page, metrics)

    @app.get("/v1/model")
    def model_info() -> dict:
        meta = predictor.meta
        described = {k: v for k, v in meta.to_dict().items() if k not in ("config", "data", "metrics", "operating_points")}
        return {"runtime": runtime, **described, **predictor.provenance.columns(),
                "metrics": {"val": None, "test": None,
                            **{k: part.mean_auc for k, part in meta.metrics.measured().items()}}}

    @app.post("/v1/predict")
    def predict(request: Request, file: UploadFile = File(..., description="a chest X-ray: PNG, JPEG, TIFF or DICOM"),
                cam: str | None = Query(None, description="a finding name, or 'top' for the most probable")) -> dict:
        name = _check_name(file.filename)
        data = file.file.read(max_upload_bytes + 1)
        if len(data) > max_upload_bytes:
            raise HTTPException(413, f"{name}: upload over the limit of {max_upload_bytes:,} bytes")
        if cam is not None and cam != "top" and cam not in predictor.findings:
            raise HTTPException(422, f"cam must be 'top' or one of {', '.join(predictor.findings)}, not {cam!r}")
        with batcher.arriving():
            pixels, prepared = _decode(data, name, slots, predictor)
        try:
            result = batcher.predict(prepared, name)
        except ConfigError as err:  # the bundle's fault, not the upload's: said, never a blank answer
            raise HTTPException(500, str(err)) from None
        if prediction_log is not None:
            _record(prediction_log, result, request.state.request_id, predictor)
        metrics.answered(result.flagged, result.positive)
        if strict and result.flagged:
            raise HTTPException(422, f"{name}: refused: {result.verdict.reason}")
        body = _answer(predictor, result, request.state.request_id)
        if cam is not None:
            finding = max(result.probabilities, key=result.probabilities.get) if cam == "top" else cam
            with batcher.lock:  # the same model as the batches' when the runtime is torch
                heat = heatmaps(predictor, pixels, [finding])[finding]  # at the network's input size
            shown = _within(pixels, OVERLAY_MAX_SIDE)
            picture = annotated_overlay(shown, heat, finding, result.probabilities[finding],
                                        (predictor.thresholds or {}).get(finding))
            body["heatmap"] = {"finding": finding, "overlay_png": _png_base64(picture),
                               "image_png": _png_base64(shown)}
        return body

    app.state.predictor, app.state.batcher = predictor, batcher
    return app


def serve(model_dir: str | os.PathLike, host: str = HOST, port: int = PORT, runtime: str = "torch",
          max_upload_bytes: int = MAX_UPLOAD_BYTES, decoders: int | None = None,
          upload_timeout_s: float = UPLOAD_TIMEOUT_S, limit_concurrency: int = MAX_CONNECTIONS,
          strict: bool = False, device: str = "auto", api_key_file: str | os.PathLike | None = None,
          max_batch: int = MAX_BATCH, batch_wait_ms: float = BATCH_WAIT_MS, max_per_client: int = MAX_PER_CLIENT,
          prediction_log: PredictionLog | None = None) -> None:
    import uvicorn

    api_key = read_api_key(api_key_file) if api_key_file else None
    app = create_app(Path(model_dir), runtime=runtime, max_upload_bytes=max_upload_bytes, decoders=decoders,
                     upload_timeout_s=upload_timeout_s, strict=strict, device=device, api_key=api_key,
                     max_batch=max_batch, batch_wait_ms=batch_wait_ms, prediction_log=prediction_log)
    uvicorn.Server(server_config(app, host, port, limit_concurrency, max_per_client=max_per_client)).run()
