"""The client's one error type: a failed call with its gRPC status and the server's message."""

from __future__ import annotations

import grpc

UNHEALTHY_MARK = "backend unhealthy"
NOT_SERVING_PREFIX = "no replica is serving: each says NOT_SERVING"


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
        code = error.code() if hasattr(error, "code") else grpc.StatusCode.UNKNOWN
        details = (error.details() if hasattr(error, "details") else str(error)) or ""
        if code == grpc.StatusCode.UNAVAILABLE and UNHEALTHY_MARK in details:
            # gRPC's own words when client-side health checking found every replica NOT_SERVING.
            details = f"{NOT_SERVING_PREFIX} (still loading its model, or shutting down); {details}"
        return cls(code or grpc.StatusCode.UNKNOWN, details, image_id)

    @property
    def not_serving(self) -> bool:
        """The server is up and answers its health checks, but says NOT_SERVING: the client sends it nothing."""
        return self.code == grpc.StatusCode.UNAVAILABLE and self.message.startswith(NOT_SERVING_PREFIX)

    @classmethod
    def from_status_number(cls, number: int, message: str, image_id: str = "") -> SegmentError:
        code = next((c for c in grpc.StatusCode if c.value[0] == number), grpc.StatusCode.UNKNOWN)
        return cls(code, message, image_id)


def health_of_refused_check(exc: grpc.RpcError) -> str:
    """A failed health check: "NOT_SERVING" when the channel's own health watch heard that (so it sends the
    server nothing, the check included); otherwise the SegmentError, raised."""
    error = SegmentError.from_rpc_error(exc)
    if error.not_serving:
        return "NOT_SERVING"
    raise error from None
