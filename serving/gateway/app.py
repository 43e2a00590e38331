"""The gateway application: middleware (request id, access log, metrics, API keys, last-resort errors), CORS,
exception handlers that keep every error in the gateway's JSON shape, and the lifespan that owns the shared
gRPC channel and the preprocessing threads."""

from __future__ import annotations

import hmac
import logging
import re
import time
import uuid
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from client.tfserving import AsyncModelServerClient
from serving.gateway import metrics
from serving.gateway.batcher import Batcher
from serving.gateway.errors import ApiError, error_response
from serving.gateway.logs import configure as configure_logs
from serving.gateway.logs import request_id_var
from serving.gateway.settings import Settings

log = logging.getLogger("gateway")
access = logging.getLogger("gateway.access")

_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:\-]{1,128}$")
_HTTP_CODES = {400: "bad_request", 401: "unauthorized", 403: "forbidden", 404: "not_found",
               405: "method_not_allowed", 408: "request_timeout", 413: "request_too_large",
               415: "unsupported_media_type", 422: "invalid_parameter", 429: "too_many_requests"}


def _route_name(scope: Scope) -> str:
    route = scope.get("route")
    path = getattr(route, "path", None)
    return path if isinstance(path, str) else "unmatched"


class GatewayMiddleware:
    """Pure ASGI (BaseHTTPMiddleware costs a task per request): request id in and out, API keys on /v1/,
    one JSON access line and the request metrics per request, and a JSON 500 for anything unexpected."""

    def __init__(self, app: ASGIApp, settings: Settings) -> None:
        self.app = app
        self.api_keys = [k.encode() for k in settings.api_key_list]

    def _authorised(self, scope: Scope) -> bool:
        given = b""
        for name, value in scope["headers"]:
            if name == b"x-api-key":
                given = value.strip()
            elif name == b"authorization" and value[:7].lower() == b"bearer ":
                given = value[7:].strip()
        # Compare against every key without short-circuit, so timing says nothing about which key matched.
        ok = False
        for key in self.api_keys:
            ok |= hmac.compare_digest(given, key)
        return ok

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        rid = ""
        for name, value in scope["headers"]:
            if name == b"x-request-id":
                candidate = value.decode("latin-1")
                rid = candidate if _REQUEST_ID.match(candidate) else ""
                break
        rid = rid or uuid.uuid4().hex
        token = request_id_var.set(rid)
        scope.setdefault("state", {})["request_id"] = rid
        status = 500
        started = False

        async def send_wrapper(message: Message) -> None:
            nonlocal status, started
            if message["type"] == "http.response.start":
                started = True
                status = message["status"]
                message.setdefault("headers", [])
                message["headers"] = [*message["headers"], (b"x-request-id", rid.encode())]
            await send(message)

        try:
            if self.api_keys and scope["path"].startswith("/v1/") and scope["method"] != "OPTIONS" \
                    and not self._authorised(scope):
                response = error_response(401, "unauthorized", "a valid API key is required (X-API-Key header "
                                          "or Authorization: Bearer)", rid, {"WWW-Authenticate": "Bearer"})
                await response(scope, receive, send_wrapper)
            else:
                await self.app(scope, receive, send_wrapper)
        except Exception:  # the last line of defence: log it, answer 500, keep the worker serving
            log.exception("unhandled error")
            if not started:
                await error_response(500, "internal_error", "an unexpected error occurred", rid)(
                    scope, receive, send_wrapper)
        finally:
            elapsed = time.perf_counter() - start
            route = _route_name(scope)
            version = scope["state"].get("model_version", "")
            metrics.REQUESTS.labels(route, scope["method"], str(status), str(version)).inc()
            metrics.LATENCY.labels(route, scope["method"]).observe(elapsed)
            if access.isEnabledFor(logging.INFO):
                client = scope.get("client")
                access.info("request", extra={
                    "method": scope["method"], "path": scope["path"], "route": route, "status": status,
                    "duration_ms": round(elapsed * 1000, 2), "model_version": version or None,
                    "images": scope["state"].get("images"), "client": client[0] if client else None,
                    "error_code": scope["state"].get("error_code"),
                })
            request_id_var.reset(token)


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()
    configure_logs(settings.log_level)  # here too: every uvicorn worker process builds its own app

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        app.state.client = AsyncModelServerClient(settings.model_server, timeout=settings.model_timeout,
                                                  model_name=settings.model_name)
        app.state.batcher = Batcher(app.state.client, max_images=settings.max_batch_images,
                                    max_calls=settings.model_concurrency)
        app.state.executor = ThreadPoolExecutor(settings.preprocess_threads, thread_name_prefix="preprocess")
        app.state.in_flight = 0
        log.info("gateway started", extra={"model_server": settings.model_server, "model": settings.model_name})
        try:
            yield
        finally:
            await app.state.batcher.close()
            await app.state.client.close()
            app.state.executor.shutdown(wait=False, cancel_futures=True)
            log.info("gateway stopped")

    app = FastAPI(
        title="CIFAR-10 classification gateway",
        version="1.0",
        description="Classifies images into the ten CIFAR-10 classes through a TensorFlow Serving model server. "
                    "Errors are `{\"error\": {\"code\", \"message\"}, \"request_id\"}`.",
        lifespan=lifespan,
    )
    app.state.settings = settings

    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError):  # noqa: ANN202
        request.scope["state"]["error_code"] = exc.code
        return error_response(exc.status, exc.code, exc.message, request.scope["state"].get("request_id", ""),
                              exc.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError):  # noqa: ANN202
        parts = []
        for err in exc.errors():
            where = ".".join(str(p) for p in err.get("loc", ()) if p not in ("query", "body"))
            parts.append(f"{where}: {err.get('msg', 'invalid')}" if where else str(err.get("msg", "invalid")))
        request.scope["state"]["error_code"] = "invalid_parameter"
        return error_response(422, "invalid_parameter", "; ".join(parts) or "invalid parameters",
                              request.scope["state"].get("request_id", ""))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):  # noqa: ANN202
        code = _HTTP_CODES.get(exc.status_code, "http_error")
        message = exc.detail if isinstance(exc.detail, str) else code.replace("_", " ")
        return error_response(exc.status_code, code, message, request.scope.get("state", {}).get("request_id", ""),
                              dict(exc.headers or {}))

    from serving.gateway.routes import router

    app.include_router(router)
    app.add_middleware(GatewayMiddleware, settings=settings)
    if settings.cors_origin_list:
        from starlette.middleware.cors import CORSMiddleware

        app.add_middleware(
            CORSMiddleware, allow_origins=settings.cors_origin_list, allow_methods=["GET", "POST", "OPTIONS"],
            allow_headers=["Content-Type", "X-API-Key", "Authorization", "X-Request-ID", "X-Filename"],
            expose_headers=["X-Request-ID", "Retry-After"], max_age=600,
        )
    return app
