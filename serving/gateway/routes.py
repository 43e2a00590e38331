"""The gateway's endpoints: classify, models, health, readiness, metrics and the web page."""

from __future__ import annotations

import asyncio
import logging
import re
import time
from importlib import resources
from typing import Any

import numpy as np
from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response
from pydantic import BaseModel, Field
from starlette.requests import ClientDisconnect

from client import contract
from client.tfserving import ModelServerError
from serving.gateway import metrics, uploads
from serving.gateway.errors import ApiError, from_model_server
from serving.gateway.settings import Settings

log = logging.getLogger("gateway")
router = APIRouter()

# Below this many bytes of images, decoding in the event loop is cheaper than a hop to a thread.
INLINE_BYTES = 64 * 1024


# ---- response models (documentation; the handlers build JSON directly, which is faster) --------------------


class TopClass(BaseModel):
    class_: str = Field(alias="class", examples=["cat"])
    class_id: int = Field(examples=[3])
    probability: float = Field(examples=[0.91])


class ImagePrediction(BaseModel):
    filename: str | None
    top: list[TopClass]
    probabilities: dict[str, float] | None = Field(None, description="all ten, when all_probabilities=true")


class ClassifyResponse(BaseModel):
    model: str
    version: int
    predictions: list[ImagePrediction]
    request_id: str


class ErrorBody(BaseModel):
    code: str
    message: str


class ErrorResponse(BaseModel):
    error: ErrorBody
    request_id: str


class VersionInfo(BaseModel):
    version: int
    state: str
    labels: list[str]
    error: ErrorBody | None = None


class ModelsResponse(BaseModel):
    model: str
    default_version: int | None = Field(description="the version answering requests that name none")
    versions: list[VersionInfo]


_ERRORS: dict[int | str, dict[str, Any]] = {
    s: {"model": ErrorResponse, "description": d} for s, d in {
        400: "malformed input: bad JSON or base64, empty image, no image, version and label both given",
        401: "API key missing or wrong (when keys are configured)",
        404: "unknown model version or label",
        408: "the request body was not received in time",
        413: "too many bytes, files or pixels",
        415: "unsupported Content-Type, or a file that is not an image",
        422: "bad parameter, or an image that cannot be decoded (truncated, zero-sized)",
        429: "too many requests in flight (Retry-After)",
        502: "the model server answered with an error",
        503: "the model server is unavailable or has no version loaded (Retry-After)",
        504: "the model server or the request took too long (Retry-After)",
    }.items()
}

_CLASSIFY_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {"schema": {"type": "object", "properties": {
                "files": {"type": "array", "items": {"type": "string", "format": "binary"}}}}},
            "image/*": {"schema": {"type": "string", "format": "binary"}},
            "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
            "application/json": {"schema": {"type": "object", "required": ["images"], "properties": {
                "images": {"type": "array", "items": {"oneOf": [
                    {"type": "string", "description": "standard base64 (a data: URL prefix is accepted)"},
                    {"type": "object", "properties": {"b64": {"type": "string"}, "filename": {"type": "string"}}},
                ]}}}}},
        },
    }
}


# ---- reading the request ----------------------------------------------------------------------------------


async def _read_body(request: Request, settings: Settings, deadline: float) -> bytes:
    length = request.headers.get("content-length")
    if length is not None:
        try:
            declared = int(length)
        except ValueError:
            raise ApiError(400, "bad_content_length", "the Content-Length header is not a number") from None
        if declared > settings.max_request_bytes:
            raise ApiError(413, "request_too_large",
                           f"the request has {declared} bytes, more than the limit of {settings.max_request_bytes}")
    chunks: list[bytes] = []
    size = 0

    async def read() -> None:
        nonlocal size
        async for chunk in request.stream():
            size += len(chunk)
            if size > settings.max_request_bytes:
                raise ApiError(413, "request_too_large",
                               f"the request has more than {settings.max_request_bytes} bytes")
            chunks.append(chunk)

    try:
        await asyncio.wait_for(read(), max(deadline - time.monotonic(), 0.001))
    except TimeoutError:
        raise ApiError(408, "request_timeout", "the request body was not received in time") from None
    except ClientDisconnect:
        raise ApiError(400, "client_disconnected", "the client closed the connection during the upload") from None
    return b"".join(chunks)


async def _images(request: Request, settings: Settings, deadline: float) -> list[uploads.Upload]:
    content_type = request.headers.get("content-type", "")
    uploads.check_content_type(content_type)  # before reading a body that could not be used
    body = await _read_body(request, settings, deadline)
    return uploads.parse_body(content_type, body, request.headers.get("x-filename"), settings)


# ---- endpoints --------------------------------------------------------------------------------------------


_CLASSIFY_PARAMS = [
    {"name": "top_k", "in": "query", "required": False, "description": "classes per image (default 3)",
     "schema": {"type": "integer", "minimum": 1, "maximum": len(contract.CLASS_NAMES)}},
    {"name": "version", "in": "query", "required": False,
     "description": "model version; default: the best available", "schema": {"type": "integer", "minimum": 1}},
    {"name": "label", "in": "query", "required": False, "description": "version label, e.g. stable or canary",
     "schema": {"type": "string", "pattern": "^[A-Za-z0-9_.-]{1,64}$"}},
    {"name": "all_probabilities", "in": "query", "required": False,
     "description": "add all ten probabilities per image", "schema": {"type": "boolean", "default": False}},
]
_LABEL = re.compile(r"^[A-Za-z0-9_.\-]{1,64}$")
_TRUE, _FALSE = {"1", "true", "yes", "on"}, {"0", "false", "no", "off", ""}


def _parameters(request: Request, settings: Settings) -> tuple[int, int | None, str | None, bool]:
    """Query parameters, validated by hand: FastAPI's per-request dependency solving is a measurable share
    of the cost of a small request. Documented through _CLASSIFY_PARAMS."""
    query = request.query_params
    problems = []

    def integer(name: str, lo: int, hi: int | None) -> int | None:
        raw = query.get(name)
        if raw is None:
            return None
        try:
            value = int(raw)
        except ValueError:
            problems.append(f"{name}: must be an integer, got {raw[:20]!r}")
            return None
        if value < lo or (hi is not None and value > hi):
            problems.append(f"{name}: must be between {lo} and {hi}" if hi else f"{name}: must be at least {lo}")
        return value

    top_k = integer("top_k", 1, len(contract.CLASS_NAMES))
    version = integer("version", 1, None)
    label = query.get("label")
    if label is not None and not _LABEL.match(label):
        problems.append("label: 1 to 64 letters, digits, '_', '.' or '-'")
    flag = query.get("all_probabilities", "false").lower()
    if flag not in _TRUE | _FALSE:
        problems.append(f"all_probabilities: must be true or false, got {flag[:20]!r}")
    if problems:
        raise ApiError(422, "invalid_parameter", "; ".join(problems))
    if version is not None and label is not None:
        raise ApiError(400, "version_and_label", "give a model version or a label, not both")
    return top_k or settings.default_top_k, version, label, flag in _TRUE


@router.post("/v1/classify", response_model=ClassifyResponse, responses=_ERRORS,
             openapi_extra={**_CLASSIFY_BODY, "parameters": _CLASSIFY_PARAMS},
             summary="Classify one or many images",
             description="Send images as multipart `files` (one or many), as a raw body (`image/*` or "
                         "`application/octet-stream`, optional `X-Filename`), or as JSON "
                         '`{"images": ["<base64>", ...]}`. All images of a request go to the model as one batch.')
async def classify(request: Request) -> Response:
    settings: Settings = request.app.state.settings
    state = request.app.state
    top_k, version, label, all_probabilities = _parameters(request, settings)
    if state.in_flight >= settings.max_in_flight:
        metrics.REJECTED.inc()
        raise ApiError(429, "overloaded", f"more than {settings.max_in_flight} requests in flight; retry later",
                       {"Retry-After": str(settings.retry_after)})
    state.in_flight += 1
    metrics.IN_FLIGHT.inc()
    try:
        return await _classify(request, settings, top_k, version, label, all_probabilities)
    finally:
        state.in_flight -= 1
        metrics.IN_FLIGHT.dec()


async def _classify(request: Request, settings: Settings, top_k: int, version: int | None, label: str | None,
                    all_probabilities: bool) -> Response:
    deadline = time.monotonic() + settings.request_timeout
    images = await _images(request, settings, deadline)
    request.scope["state"]["images"] = len(images)
    started = time.perf_counter()
    if sum(len(d) for _, d in images) <= INLINE_BYTES:
        batch = uploads.decode_images(images, settings.max_pixels)
    else:
        # Pillow releases the GIL while decoding and resizing: big images run in parallel threads.
        loop = asyncio.get_running_loop()
        try:
            batch = await asyncio.wait_for(
                loop.run_in_executor(request.app.state.executor, uploads.decode_images, images, settings.max_pixels),
                max(deadline - time.monotonic(), 0.001))
        except TimeoutError:
            raise ApiError(504, "request_timeout", "decoding the images took too long",
                           {"Retry-After": str(settings.retry_after)}) from None
    metrics.PREPROCESS.observe(time.perf_counter() - started)

    left = deadline - time.monotonic()
    if left <= 0:
        raise ApiError(504, "request_timeout", "the request took too long", {"Retry-After": str(settings.retry_after)})
    started = time.perf_counter()
    try:
        prediction = await request.app.state.batcher.predict(
            batch, version=version, label=label, timeout=min(settings.model_timeout, left))
    except ModelServerError as exc:
        metrics.MODEL_CALLS.labels(exc.code.name.lower()).observe(time.perf_counter() - started)
        log.warning("model server call failed", extra={"grpc_code": exc.code.name, "detail": exc.message[:300]})
        raise from_model_server(exc, settings.retry_after, version, label) from None
    metrics.MODEL_CALLS.labels("ok").observe(time.perf_counter() - started)
    request.scope["state"]["model_version"] = prediction.version
    metrics.observe_predictions(prediction.version, prediction.probabilities)
    return JSONResponse(_answer(images, prediction.version, prediction.probabilities, top_k, all_probabilities,
                                settings.model_name, request.scope["state"]["request_id"]))


def _answer(images: list[uploads.Upload], version: int, probabilities: np.ndarray, top_k: int,
            all_probabilities: bool, model: str, request_id: str) -> dict:
    names = contract.CLASS_NAMES
    order = np.argsort(-probabilities, axis=1, kind="stable")[:, :top_k]
    rows = probabilities.tolist()
    predictions = []
    for (filename, _), row, top in zip(images, rows, order.tolist(), strict=True):
        item: dict[str, Any] = {
            "filename": filename,
            "top": [{"class": names[c], "class_id": c, "probability": row[c]} for c in top],
        }
        if all_probabilities:
            item["probabilities"] = dict(zip(names, row, strict=True))
        predictions.append(item)
    return {"model": model, "version": version, "predictions": predictions, "request_id": request_id}


@router.get("/v1/models", response_model=ModelsResponse, responses={s: _ERRORS[s] for s in (401, 503, 504)},
            summary="Versions held by the model server, their states and labels")
async def models(request: Request) -> Response:
    settings: Settings = request.app.state.settings
    client = request.app.state.client
    try:
        statuses = await client.model_status(timeout=settings.status_timeout)
    except ModelServerError as exc:
        raise from_model_server(exc, settings.retry_after) from None
    # GetModelStatus cannot list labels: ask where each configured label points.
    resolved = await asyncio.gather(*(client.model_status(label=name, timeout=settings.status_timeout)
                                      for name in settings.label_names), return_exceptions=True)
    labels: dict[int, list[str]] = {}
    for name, result in zip(settings.label_names, resolved, strict=True):
        if isinstance(result, list):
            for status in result:
                labels.setdefault(status.version, []).append(name)
        elif not isinstance(result, ModelServerError):
            raise result
    versions = []
    for s in statuses:
        info: dict[str, Any] = {"version": s.version, "state": s.state, "labels": labels.get(s.version, [])}
        if s.error_code != "OK":
            info["error"] = {"code": s.error_code, "message": s.error_message}
        versions.append(info)
    available = [s.version for s in statuses if s.state == "AVAILABLE"]
    return JSONResponse({"model": settings.model_name, "default_version": max(available, default=None),
                         "versions": versions})


@router.get("/healthz", summary="Liveness: the gateway process answers")
async def healthz() -> dict:
    return {"status": "ok"}


@router.get("/readyz", summary="Readiness: the model server has a version AVAILABLE",
            responses={503: _ERRORS[503]})
async def readyz(request: Request) -> Response:
    settings: Settings = request.app.state.settings
    retry = {"Retry-After": str(settings.retry_after)}
    try:
        statuses = await request.app.state.client.model_status(timeout=settings.status_timeout)
    except ModelServerError as exc:
        err = from_model_server(exc, settings.retry_after)
        raise ApiError(503, "not_ready", f"not ready: {err.message}", retry) from None
    available = [s.version for s in statuses if s.state == "AVAILABLE"]
    if not available:
        raise ApiError(503, "not_ready", "no model version is AVAILABLE yet", retry)
    return JSONResponse({"status": "ready", "available_versions": available})


@router.get("/metrics", summary="Prometheus metrics", response_class=Response)
async def prometheus() -> Response:
    body, content_type = metrics.render()
    return Response(body, media_type=content_type)


_PAGE: bytes | None = None


@router.get("/", response_class=HTMLResponse, include_in_schema=False)
async def page() -> Response:
    global _PAGE
    if _PAGE is None:
        _PAGE = resources.files("serving.gateway").joinpath("static/index.html").read_bytes()
    return HTMLResponse(_PAGE)
