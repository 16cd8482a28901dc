"""One error type that carries its gRPC status; the servicer maps it to the call in one place."""

from __future__ import annotations

import re

import grpc

_ABSOLUTE_PATH = re.compile(r"(?<![\w.~/-])/(?!/)[^\s'\"`,;()\[\]{}<>]+")


def without_server_paths(text: str) -> str:
    """`text` as a caller may read it: each absolute path on the server becomes its last component, or its
    last two for a deeper one ('.../MODEL/config.yaml'), so answers and metrics never show where the server
    keeps its files (its log keeps them whole). Relative paths and media types are left alone."""

    def short(match: re.Match[str]) -> str:
        parts = [part for part in match.group(0).split("/") if part]
        return ".../" + "/".join(parts[-2:] if len(parts) > 2 else parts[-1:])

    return _ABSOLUTE_PATH.sub(short, text)


class SegservError(Exception):
    """An error a caller can act on; `code` is the gRPC status it is answered with."""

    code: grpc.StatusCode = grpc.StatusCode.INTERNAL

    def __init__(self, message: str, code: grpc.StatusCode | None = None) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code


class InvalidImage(SegservError):
    """Empty, undecodable or otherwise unusable image bytes."""

    code = grpc.StatusCode.INVALID_ARGUMENT


class InvalidRequest(SegservError):
    """A request that cannot be parsed at all (bytes that are no message of its type, a malformed body)."""

    code = grpc.StatusCode.INVALID_ARGUMENT


class InvalidOptions(SegservError):
    """A request option out of its allowed range."""

    code = grpc.StatusCode.INVALID_ARGUMENT


class ImageTooLarge(SegservError):
    """An image over the byte or pixel limits."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class Overloaded(SegservError):
    """The admission queue is full."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class NotReady(SegservError):
    """The model is still loading, or the server is shutting down."""

    code = grpc.StatusCode.UNAVAILABLE


class RequestExpired(SegservError):
    """The caller's deadline passed before the model reached the request."""

    code = grpc.StatusCode.DEADLINE_EXCEEDED


class RequestCancelled(SegservError):
    """The caller went away before the model reached the request."""

    code = grpc.StatusCode.CANCELLED


class ModelLoadError(SegservError):
    """The configured model or weights cannot be loaded (a start-up error, never sent to a caller)."""


class UploadStalled(SegservError):
    """An upload's next chunk did not come within SEGSERVE_UPLOAD_IDLE_TIMEOUT_S; the call is ended to free
    its bytes. DEADLINE_EXCEEDED: a time limit ran out; not CANCELLED (the caller did not cancel) nor
    UNAVAILABLE (which clients retry at once, and the same stalled sender would stall again)."""

    code = grpc.StatusCode.DEADLINE_EXCEEDED


class UnknownModel(SegservError):
    """A model name (or version) this server does not serve."""

    code = grpc.StatusCode.NOT_FOUND


class InvalidTensor(SegservError):
    """An inference-protocol request whose inputs, outputs or parameters break the model's tensor contract."""

    code = grpc.StatusCode.INVALID_ARGUMENT


class TooManyImages(SegservError):
    """One request with more images than the queue admits at once: it could never be served."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class NotServed(SegservError):
    """A protocol method segserve does not implement."""

    code = grpc.StatusCode.UNIMPLEMENTED


class ModelControlRefused(SegservError):
    """Loading or unloading at run time is off (SEGSERVE_MODEL_CONTROL), or asked in a way segserve refuses."""

    code = grpc.StatusCode.FAILED_PRECONDITION


class Unauthenticated(SegservError):
    """A model-control call without the control token, or with another one (SEGSERVE_CONTROL_TOKEN)."""

    code = grpc.StatusCode.UNAUTHENTICATED


class NotPermitted(SegservError):
    """Under TLS with client certificates, a model-control call from a caller without one."""

    code = grpc.StatusCode.PERMISSION_DENIED


class TooManyModels(SegservError):
    """A load past SEGSERVE_MAX_MODELS or SEGSERVE_MAX_MODEL_WEIGHTS_BYTES."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class ModelLoadFailed(SegservError):
    """A load asked at run time whose config or weights are unusable; the others serve on."""

    code = grpc.StatusCode.INVALID_ARGUMENT
