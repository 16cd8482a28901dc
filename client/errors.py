"""The client's one error type: a failed call with its gRPC status and the server's message; and the one place
where both clients turn a failed call (grpc.RpcError, or grpc.aio's AioRpcError) into it: `segment_errors`."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import grpc

UNHEALTHY_MARK = "backend unhealthy"
NOT_SERVING_PREFIX = "no replica is serving: each says NOT_SERVING"
LOST_STATUS_MESSAGE = (
    "the stream ended while a request was being sent, and grpc.aio lost the status it ended with "
    "(grpc/grpc#36066); most often its replica was lost"
)


class SegmentError(Exception):
    def __init__(self, code: grpc.StatusCode, message: str, image_id: str = "") -> None:
        self.code = code
        self.message = message
        self.image_id = image_id
        super().__init__(str(self))

    def __str__(self) -> str:
        return f"{self.code.name}: {self.message}"

    @classmethod
    def from_rpc_error(cls, error: grpc.RpcError, image_id: str = "") -> SegmentError:
        code = status_code(error)
        details = (error.details() if hasattr(error, "details") else str(error)) or ""
        if status_lost(error):
            details = f"{LOST_STATUS_MESSAGE} ({details})"
        if code == grpc.StatusCode.UNAVAILABLE and UNHEALTHY_MARK in details:
            # gRPC's own words when client-side health checking found every replica NOT_SERVING.
            details = f"{NOT_SERVING_PREFIX} (still loading its model, or shutting down); {details}"
        return cls(code, details, image_id)

    @property
    def not_serving(self) -> bool:
        """The server is up and answers its health checks, but says NOT_SERVING: the client sends it nothing."""
        return self.code == grpc.StatusCode.UNAVAILABLE and self.message.startswith(NOT_SERVING_PREFIX)

    @classmethod
    def from_status_number(cls, number: int, message: str, image_id: str = "") -> SegmentError:
        code = next((c for c in grpc.StatusCode if c.value[0] == number), grpc.StatusCode.UNKNOWN)
        return cls(code, message, image_id)


def not_serving_in_time(target: str, timeout: float, last: str) -> SegmentError:
    """What wait_until_serving raises when `timeout` passed without SERVING: `last`, the last answer or error."""
    return SegmentError(
        grpc.StatusCode.DEADLINE_EXCEEDED, f"server at {target} not serving after {timeout:.0f}s ({last})"
    )


def health_of_refused_check(exc: grpc.RpcError) -> str:
    """A failed health check: "NOT_SERVING" when the channel's own health watch heard that (so it sends the
    server nothing, the check included); otherwise the SegmentError, raised."""
    error = SegmentError.from_rpc_error(exc)
    if error.not_serving:
        return "NOT_SERVING"
    raise error from None


def status_code(error: grpc.RpcError) -> grpc.StatusCode:
    """The status a failed call ended with. grpc.aio's errors are no grpc.Call, so this asks for `code()`
    rather than the type; an RpcError without one (raised by hand) is UNKNOWN."""
    code = getattr(error, "code", None)
    found = code() if callable(code) else None
    return found if isinstance(found, grpc.StatusCode) else grpc.StatusCode.UNKNOWN


def status_lost(error: grpc.RpcError) -> bool:
    """grpc.aio's INTERNAL "Internal error from Core" for a request written as the call ended: a write that
    fails after the server's status arrived replaces that status (grpc/grpc#36066, open in grpcio 1.85.1),
    so the call's own code and details are gone. A stream cut while its requests are still going out (a lost
    replica) often ends so. The sync API keeps the server's status."""
    debug = getattr(error, "debug_error_string", None)
    return status_code(error) == grpc.StatusCode.INTERNAL and callable(debug) and "SendMessageOperation" in str(debug())


@contextmanager
def segment_errors(image_id: str = "") -> Iterator[None]:
    """A failed call inside the block raises SegmentError (about `image_id`, when one image's) instead of
    the RpcError, with gRPC's traceback left out: callers catch one type whichever client they use.

    Works around an awaited call too (`with segment_errors(): await stub.Segment(...)`): the error is raised
    where the call is awaited, inside the block.
    """
    try:
        yield
    except grpc.RpcError as exc:
        raise SegmentError.from_rpc_error(exc, image_id) from None
