"""The HTTP service: FastAPI over one loaded model bundle.

``POST /v1/predict``   multipart ``file`` (PNG, JPEG, TIFF or DICOM) -> probabilities, positive
                       findings at the bundle's thresholds, and with ``?cam=FINDING`` (or
                       ``cam=top``) a Grad-CAM overlay as a base64 PNG
``GET /v1/model``      the bundle's metadata (findings, thresholds, image size, metrics, versions)
``GET /healthz``       liveness
``GET /``              a web page: drop an X-ray, see the 14 probabilities and the heatmap

Bad input is the client's fault and is answered 4xx with a message naming
what is wrong, never 500: an upload over the size limit (413, refused from
its Content-Length before it is read where the client sends one), an empty
or undecodable file, a decompression bomb, a DICOM without pixels (422), a
file name with path separators (400). Inference runs in FastAPI's thread pool
behind a lock: one forward pass at a time uses every core, and a request
that fails frees the lock like any other.
"""

from __future__ import annotations

import base64
import io
import os
import threading
from importlib import resources
from pathlib import Path

import numpy as np
from fastapi import FastAPI, File, HTTPException, Query, Request, UploadFile
from fastapi.responses import HTMLResponse, JSONResponse

from cxrlearn.errors import DataError

from cxrlearn.serving import MAX_UPLOAD_BYTES


def _png_base64(rgb_or_gray: np.ndarray) -> str:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(rgb_or_gray).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def _check_name(name: str | None) -> str:
    name = name or "upload"
    if "/" in name or "\\" in name or name in (".", "..") or "\x00" in name:
        raise HTTPException(400, f"file name {name!r} must be a plain name, without path separators")
    return name


def _decode(data: bytes, name: str) -> np.ndarray:
    """Decoded grayscale pixels of an upload; every failure is the upload's and becomes a 4xx.

    Images over Pillow's decompression-bomb limit (``Image.MAX_IMAGE_PIXELS``, 89 MP; DICOM is held to
    the same) are refused from their headers, before any pixel is decoded.
    """
    from cxrlearn.data.images import decode_grayscale

    if not data:
        raise HTTPException(422, f"{name}: the upload is empty")
    try:
        return decode_grayscale(data, name)
    except DataError as err:
        raise HTTPException(413 if "implausibly large" in str(err) else 422, str(err)) from None
    except Exception as err:  # noqa: BLE001 - a decoder's own failure on hostile bytes is still bad input
        raise HTTPException(422, f"{name}: cannot decode ({type(err).__name__}: {err})") from None


def create_app(model_dir: str | os.PathLike, runtime: str = "torch", max_upload_bytes: int = MAX_UPLOAD_BYTES) -> FastAPI:
    from cxrlearn.inference.predictor import Predictor

    predictor = Predictor(model_dir, runtime=runtime)
    cam_predictor = predictor if runtime == "torch" else Predictor(model_dir, runtime="torch")
    lock = threading.Lock()
    app = FastAPI(title="cxrlearn", description="Chest X-ray findings (NIH ChestX-ray14)", version="1")
    page = resources.files("cxrlearn.serving").joinpath("page.html").read_text(encoding="utf-8")

    @app.middleware("http")
    async def refuse_large_bodies(request: Request, call_next):
        length = request.headers.get("content-length")
        if length and length.isdigit() and int(length) > max_upload_bytes + 64 * 1024:  # room for the multipart framing
            return JSONResponse({"detail": f"upload of {int(length):,} bytes is over the limit of "
                                           f"{max_upload_bytes:,} bytes"}, status_code=413)
        return await call_next(request)

    @app.get("/healthz")
    def healthz() -> dict:
        return {"status": "ok"}

    @app.get("/v1/model")
    def model_info() -> dict:
        meta = predictor.meta
        keys = ("backbone", "image_size", "in_chans", "normalization", "findings", "thresholds", "threshold_method",
                "temperature", "tta", "weights_source", "split", "evaluation", "versions")
        return {"runtime": runtime, **{k: meta.get(k) for k in keys},
                "metrics": {k: meta.get("metrics", {}).get(k, {}).get("mean_auc") for k in ("val", "test")}}

    @app.post("/v1/predict")
    def predict(file: UploadFile = File(..., description="a chest X-ray: PNG, JPEG, TIFF or DICOM"),
                cam: str | None = Query(None, description="a finding name, or 'top' for the most probable")) -> dict:
        name = _check_name(file.filename)
        data = file.file.read(max_upload_bytes + 1)
        if len(data) > max_upload_bytes:
            raise HTTPException(413, f"{name}: upload over the limit of {max_upload_bytes:,} bytes")
        if cam is not None and cam != "top" and cam not in predictor.findings:
            raise HTTPException(422, f"cam must be 'top' or one of {', '.join(predictor.findings)}, not {cam!r}")
        pixels = _decode(data, name)
        with lock:
            result = predictor.predict([pixels], [name])[0]
            body = {
                "image": name,
                "probabilities": result.probabilities,
                "positive_findings": result.positive,
                "thresholds": predictor.thresholds or None,
                "threshold_method": predictor.meta.get("threshold_method"),
            }
            if cam is not None:
                from cxrlearn.inference.gradcam import heatmaps, overlay

                finding = max(result.probabilities, key=result.probabilities.get) if cam == "top" else cam
                heat = heatmaps(cam_predictor, pixels, [finding])[finding]
                model_pixels = predictor.model_pixels(pixels)
                body["heatmap"] = {"finding": finding, "overlay_png": _png_base64(overlay(model_pixels, heat)),
                                   "image_png": _png_base64(model_pixels)}
        return body

    @app.get("/", response_class=HTMLResponse)
    def index() -> str:
        return page

    app.state.predictor = predictor
    return app


def serve(model_dir: str | os.PathLike, host: str = "127.0.0.1", port: int = 8000, runtime: str = "torch",
          max_upload_bytes: int = MAX_UPLOAD_BYTES) -> None:
    import uvicorn

    app = create_app(Path(model_dir), runtime=runtime, max_upload_bytes=max_upload_bytes)
    uvicorn.run(app, host=host, port=port, log_level="info")
