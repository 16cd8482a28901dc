"""The HTTP door's one mapping of errors to statuses: a SegservError's gRPC code (and for a few, its kind)
to an HTTP status, answered as JSON {"error": one sentence}; never a traceback."""

from __future__ import annotations

import grpc
from starlette.responses import JSONResponse

from server.errors import (
    ImageTooLarge,
    InvalidOptions,
    NotReady,
    Overloaded,
    SegservError,
    TooManyImages,
    UploadStalled,
)

_STATUS_OF_CODE = {
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.UNIMPLEMENTED: 501,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
    grpc.StatusCode.CANCELLED: 499,
    grpc.StatusCode.FAILED_PRECONDITION: 400,
    grpc.StatusCode.PERMISSION_DENIED: 403,
    grpc.StatusCode.UNAUTHENTICATED: 401,
    # What is left of RESOURCE_EXHAUSTED once images and the queue are matched: a load past the model limits.
    grpc.StatusCode.RESOURCE_EXHAUSTED: 409,
}
CODE_OF_STATUS = {400: "INVALID_ARGUMENT", 404: "NOT_FOUND", 405: "UNIMPLEMENTED", 413: "RESOURCE_EXHAUSTED"}
"""The status name a request refused by routing itself (no endpoint, wrong method) counts under."""


class UnsupportedMediaType(InvalidOptions):
    """A Content-Type (or Content-Encoding) the endpoint does not take."""


def http_status(error: SegservError) -> int:
    if isinstance(error, ImageTooLarge | TooManyImages):
        return 413
    if isinstance(error, Overloaded):
        return 429
    if isinstance(error, UnsupportedMediaType):
        return 415
    if isinstance(error, UploadStalled):
        return 408  # the body stopped arriving: RFC 9110's Request Timeout
    if isinstance(error, NotReady):
        return 503
    return _STATUS_OF_CODE.get(error.code, 500)


def error_response(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)
