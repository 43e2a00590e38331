"""Error answers: `{"error": {"code", "message"}, "request_id"}` with the right HTTP status.

Every failure the gateway knows about is an ApiError; anything else is caught by the app's last-resort
handler, logged with its traceback and answered 500 `internal_error` without taking the worker down.
"""

from __future__ import annotations

import grpc
from starlette.responses import JSONResponse

from client.preprocessing import ImageError
from client.tfserving import ModelServerError

# ImageError codes (client/preprocessing.py) -> HTTP status.
IMAGE_STATUS = {
    "empty_image": 400,
    "not_an_image": 415,
    "invalid_image": 422,
    "truncated_image": 422,
    "zero_size_image": 422,
    "unsupported_image_mode": 422,
    "image_too_large": 413,
}


class ApiError(Exception):
    def __init__(self, status: int, code: str, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = headers or {}


def error_response(status: int, code: str, message: str, request_id: str,
                   headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": {"code": code, "message": message}, "request_id": request_id},
                        status_code=status, headers=headers)


def from_image_error(exc: ImageError, filename: str | None) -> ApiError:
    where = f"{filename}: " if filename else ""
    return ApiError(IMAGE_STATUS.get(exc.code, 422), exc.code, where + exc.message)


def from_model_server(exc: ModelServerError, retry_after: int, version: int | None = None,
                      label: str | None = None) -> ApiError:
    """gRPC status of the model server -> the gateway's answer (retryable ones carry Retry-After)."""
    retry = {"Retry-After": str(retry_after)}
    code = exc.code
    if code == grpc.StatusCode.UNAVAILABLE:
        return ApiError(503, "model_server_unavailable", f"the model server is unavailable: {exc.message}", retry)
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return ApiError(504, "model_server_timeout", "the model server did not answer in time", retry)
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
        return ApiError(429, "model_server_overloaded", f"the model server is overloaded: {exc.message}", retry)
    if code == grpc.StatusCode.NOT_FOUND:
        if version is not None:
            return ApiError(404, "version_not_found", f"model version {version} is not available: {exc.message}")
        return ApiError(503, "no_version_available", f"no model version is available: {exc.message}", retry)
    if label is not None and code in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.FAILED_PRECONDITION) \
            and "label" in exc.message.lower():
        return ApiError(404, "label_not_found", f"model label {label!r} is not assigned: {exc.message}")
    if code == grpc.StatusCode.CANCELLED:
        return ApiError(503, "model_server_unavailable", f"the model server call was cancelled: {exc.message}", retry)
    return ApiError(502, "model_server_error", f"the model server failed: {code.name}: {exc.message}")
