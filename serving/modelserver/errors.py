"""Errors carried with a gRPC status code, and the code → HTTP status table of TF Serving's REST server."""

from __future__ import annotations

import grpc

# TF Serving cuts status messages it returns over gRPC at this length.
MAX_MESSAGE = 1024

HTTP_STATUS = {
    grpc.StatusCode.OK: 200,
    grpc.StatusCode.CANCELLED: 499,
    grpc.StatusCode.UNKNOWN: 500,
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.ALREADY_EXISTS: 409,
    grpc.StatusCode.PERMISSION_DENIED: 403,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.FAILED_PRECONDITION: 400,
    grpc.StatusCode.ABORTED: 409,
    grpc.StatusCode.OUT_OF_RANGE: 400,
    grpc.StatusCode.UNIMPLEMENTED: 501,
    grpc.StatusCode.INTERNAL: 500,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DATA_LOSS: 500,
    grpc.StatusCode.UNAUTHENTICATED: 401,
}

# tensorflow.error.Code numbers (as in error_codes.proto) by gRPC code; the values are the same.
CODE_NUMBER = {code: code.value[0] for code in grpc.StatusCode}
CODE_BY_NAME = {code.name: code for code in grpc.StatusCode}


class ServingError(Exception):
    """A request or load failure with the status code TF Serving would return."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message

    def __str__(self) -> str:
        return f"{self.code.name}: {self.message}"


def invalid(message: str) -> ServingError:
    return ServingError(grpc.StatusCode.INVALID_ARGUMENT, message)


def not_found(message: str) -> ServingError:
    return ServingError(grpc.StatusCode.NOT_FOUND, message)


def from_exception(exc: BaseException) -> ServingError:
    """Maps TensorFlow's OpError (whose error_code numbers match gRPC's) and anything else to a ServingError."""
    if isinstance(exc, ServingError):
        return exc
    number = getattr(exc, "error_code", None)
    if isinstance(number, int):
        for code in grpc.StatusCode:
            if code.value[0] == number:
                return ServingError(code, getattr(exc, "message", None) or str(exc))
    return ServingError(grpc.StatusCode.UNKNOWN, f"{type(exc).__name__}: {exc}")
