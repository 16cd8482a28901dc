"""The blocking client."""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator
from types import TracebackType
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from client.channel import DEFAULT_TARGET
from client.errors import SegmentError
from client.messages import UPLOAD_THRESHOLD, ImageInput, Options, single_call, stream_requests
from client.results import SegmentationResult, failed_result, unreadable_result
from client.security import open_channel, request_metadata
from protos.segserve.v1 import segserve_pb2 as pb
from protos.segserve.v1 import segserve_pb2_grpc as pb_grpc


class SegmentClient:
    """Talks to a segserve server. Use as a context manager, or call close().

    >>> with SegmentClient("localhost:50051") as client:
    ...     result = client.segment("photo.jpg", overlay=True)
    ...     result.mask.shape, result.summary()
    """

    def __init__(
        self,
        target: str = DEFAULT_TARGET,
        *,
        timeout: float | None = 60.0,
        upload_threshold: int = UPLOAD_THRESHOLD,
        channel: grpc.Channel | None = None,
        credentials: grpc.ChannelCredentials | None = None,
    ) -> None:
        self.target = target
        self.timeout = timeout
        self.upload_threshold = upload_threshold
        self._channel = channel or open_channel(target, credentials)
        self._stub = pb_grpc.SegmenterStub(self._channel)
        self._health = health_pb2_grpc.HealthStub(self._channel)

    def segment(
        self,
        image: ImageInput,
        *,
        max_size: int = 0,
        overlay: bool = False,
        overlay_opacity: float | None = None,
        image_id: str | None = None,
        timeout: float | None = None,
        request_id: str | None = None,
    ) -> SegmentationResult:
        """Segment one image (bytes, a path or a PIL image); large ones go through SegmentUpload."""
        call = single_call(image, Options(max_size, overlay, overlay_opacity), image_id, self.upload_threshold)
        method: Any = self._stub.SegmentUpload if call.upload else self._stub.Segment
        timeout = self.timeout if timeout is None else timeout
        try:
            response = method(call.request, timeout=timeout, metadata=request_metadata(request_id))
        except grpc.RpcError as exc:
            raise SegmentError.from_rpc_error(exc, call.image_id) from None
        return SegmentationResult.from_proto(response)

    def segment_many(
        self,
        images: Iterable[ImageInput],
        *,
        max_size: int = 0,
        overlay: bool = False,
        overlay_opacity: float | None = None,
        timeout: float | None = None,
        request_id: str | None = None,
    ) -> Iterator[SegmentationResult]:
        """Segment many images over one SegmentStream, yielding results as they arrive (any order).

        A failed image yields a result with `error` set; the others carry on. Ids are the file
        names for paths and "0", "1"... otherwise. Images above the upload threshold go through
        SegmentUpload after the stream.
        """
        options = Options(max_size, overlay, overlay_opacity)
        timeout = self.timeout if timeout is None else timeout
        deferred: list[tuple[str, bytes | OSError]] = []
        try:
            for response in self._stub.SegmentStream(
                stream_requests(images, options, self.upload_threshold, deferred),
                timeout=timeout,
                metadata=request_metadata(request_id),
            ):
                yield SegmentationResult.from_proto(response)
        except grpc.RpcError as exc:
            raise SegmentError.from_rpc_error(exc) from None
        for image_id, item in deferred:
            if isinstance(item, OSError):
                yield unreadable_result(image_id, item)
                continue
            try:
                yield self.segment(
                    item,
                    max_size=max_size,
                    overlay=overlay,
                    overlay_opacity=overlay_opacity,
                    image_id=image_id,
                    timeout=timeout,
                )
            except SegmentError as exc:
                yield failed_result(image_id, exc)

    def model_info(self, timeout: float | None = None) -> pb.ModelInfo:
        try:
            return self._stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=timeout or self.timeout)
        except grpc.RpcError as exc:
            raise SegmentError.from_rpc_error(exc) from None

    def health(self, service: str = "", timeout: float | None = 5.0) -> str:
        """ "SERVING", "NOT_SERVING", ... ; raises SegmentError when the server cannot be reached."""
        try:
            response = self._health.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout)
        except grpc.RpcError as exc:
            raise SegmentError.from_rpc_error(exc) from None
        return str(health_pb2.HealthCheckResponse.ServingStatus.Name(response.status))

    def wait_until_serving(self, timeout: float = 60.0) -> None:
        """Blocks until the health service says SERVING; raises SegmentError on timeout."""
        deadline = time.monotonic() + timeout
        last = "no answer"
        while time.monotonic() < deadline:
            try:
                last = self.health(timeout=max(0.1, min(2.0, deadline - time.monotonic())))
                if last == "SERVING":
                    return
            except SegmentError as exc:
                last = str(exc)
            time.sleep(0.2)
        raise SegmentError(
            grpc.StatusCode.DEADLINE_EXCEEDED, f"server at {self.target} not serving after {timeout:.0f}s ({last})"
        )

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> SegmentClient:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
