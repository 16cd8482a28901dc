"""The asyncio client: the same calls as SegmentClient, awaitable."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable, Iterable, Iterator
from types import TracebackType
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from client.channel import DEFAULT_TARGET
from client.errors import SegmentError, health_of_refused_check
from client.frames import (
    DEFAULT_FRAME_FORMAT,
    DEFAULT_WINDOW,
    Frame,
    FrameResult,
    FrameWindow,
    VideoInput,
    frame_source,
)
from client.messages import (
    PROGRESS_POLL_S,
    UPLOAD_THRESHOLD,
    ImageInput,
    Options,
    load_deadline,
    load_phase,
    single_call,
    stream_requests,
)
from client.results import SegmentationResult, failed_result, unreadable_result
from client.security import open_aio_channel, request_metadata
from protos.inference import grpc_predict_v2_pb2 as inference_pb
from protos.inference import grpc_predict_v2_pb2_grpc as inference_pb_grpc
from protos.segserve.v1 import segserve_pb2 as pb
from protos.segserve.v1 import segserve_pb2_grpc as pb_grpc


class AsyncSegmentClient:
    """`async with AsyncSegmentClient(target) as client: result = await client.segment(path)`."""

    def __init__(
        self,
        target: str = DEFAULT_TARGET,
        *,
        timeout: float | None = 60.0,
        upload_threshold: int = UPLOAD_THRESHOLD,
        credentials: grpc.ChannelCredentials | None = None,
    ) -> None:
        self.target = target
        self.timeout = timeout
        self.upload_threshold = upload_threshold
        self._channel = open_aio_channel(target, credentials)
        self._stub = pb_grpc.SegmenterStub(self._channel)
        self._health = health_pb2_grpc.HealthStub(self._channel)
        self._inference = inference_pb_grpc.GRPCInferenceServiceStub(self._channel)

    async def segment(
        self,
        image: ImageInput,
        *,
        max_size: int = 0,
        overlay: bool = False,
        overlay_opacity: float | None = None,
        model: str = "",
        image_id: str | None = None,
        timeout: float | None = None,
        request_id: str | None = None,
    ) -> SegmentationResult:
        call = single_call(image, Options(max_size, overlay, overlay_opacity, model), image_id, self.upload_threshold)
        method: Any = self._stub.SegmentUpload if call.upload else self._stub.Segment
        timeout = self.timeout if timeout is None else timeout
        try:
            response = await method(call.request, timeout=timeout, metadata=request_metadata(request_id))
        except grpc.RpcError as exc:
            raise SegmentError.from_rpc_error(exc, call.image_id) from None
        return SegmentationResult.from_proto(response)

    async def segment_many(
        self,
        images: Iterable[ImageInput],
        *,
        max_size: int = 0,
        overlay: bool = False,
        overlay_opacity: float | None = None,
        model: str = "",
        timeout: float | None = None,
        request_id: str | None = None,
    ) -> AsyncIterator[SegmentationResult]:
        """As SegmentClient.segment_many: results in arrival order, failures as results with `error`."""
        options = Options(max_size, overlay, overlay_opacity, model)
        timeout = self.timeout if timeout is None else timeout
        deferred: list[tuple[str, bytes | OSError]] = []
        call = self._stub.SegmentStream(
            stream_requests(images, options, self.upload_threshold, deferred),
            timeout=timeout,
            metadata=request_metadata(request_id),
        )
        try:
            async for response in call:
                yield SegmentationResult.from_proto(response)
        except grpc.RpcError as exc:
            raise SegmentError.from_rpc_error(exc) from None
        for image_id, item in deferred:
            if isinstance(item, OSError):
                yield unreadable_result(image_id, item)
                continue
            try:
                yield await self.segment(
                    item,
                    max_size=max_size,
                    overlay=overlay,
                    overlay_opacity=overlay_opacity,
                    model=model,
                    image_id=image_id,
                    timeout=timeout,
                )
            except SegmentError as exc:
                yield failed_result(image_id, exc)

    async def segment_video(
        self,
        path_or_frames: VideoInput,
        *,
        max_size: int = 0,
        model: str = "",
        every: int = 1,
        window: int = DEFAULT_WINDOW,
        frame_format: str = DEFAULT_FRAME_FORMAT,
        timeout: float | None = None,
        request_id: str | None = None,
    ) -> AsyncIterator[FrameResult]:
        """As SegmentClient.segment_video: one FrameResult per frame, in frame order, over one stream.

        Reading, decoding and encoding frames run in a worker thread, so the event loop stays free.
        """
        window_ = FrameWindow(window, every, Options(max_size, model=model), frame_format)
        source = frame_source(path_or_frames)
        changed = asyncio.Condition()
        failures: list[BaseException] = []  # of the call: end at once
        source_failures: list[BaseException] = []  # of the frames: raised after the frames already sent
        # Written to as frames come, so the sender can wait for room in the window (the stubs' types
        # only know the request-iterator form).
        open_stream: Any = self._stub.SegmentStream
        call = open_stream(timeout=timeout, metadata=request_metadata(request_id))

        def next_request(frames: Iterator[tuple[int, Any]]) -> tuple[int, Any, pb.SegmentRequest | None] | None:
            item = next(frames, None)
            return None if item is None else (*item, window_.request_for(*item))

        async def send() -> None:
            try:
                while (item := await asyncio.to_thread(next_request, source)) is not None:
                    index, frame, request = item
                    async with changed:
                        await changed.wait_for(lambda: not window_.full)
                        window_.hold(index, frame)
                        changed.notify_all()
                    if request is not None:
                        await call.write(request)
                await call.done_writing()
            except (grpc.RpcError, asyncio.InvalidStateError):
                pass  # the call ended; receive() reports why
            except Exception as exc:
                source_failures.append(exc)
                with contextlib.suppress(grpc.RpcError, asyncio.InvalidStateError):
                    await call.done_writing()

        async def receive() -> None:
            try:
                async for response in call:
                    async with changed:
                        window_.answer(response)
                        changed.notify_all()
            except grpc.RpcError as exc:
                failures.append(SegmentError.from_rpc_error(exc))
            except SegmentError as exc:
                failures.append(exc)
            finally:
                async with changed:
                    window_.answers_done = True
                    changed.notify_all()

        tasks = [asyncio.create_task(send()), asyncio.create_task(receive())]
        try:
            while True:
                async with changed:
                    await changed.wait_for(lambda: window_.has_ready() or window_.answers_done or bool(failures))
                    ready = window_.pop_ready()
                    changed.notify_all()
                for result in ready:
                    yield result
                if not ready and (window_.answers_done or failures):
                    break
            await asyncio.gather(*tasks)
            if failures or source_failures:
                raise (failures or source_failures)[0]
            window_.check_complete()
        finally:
            call.cancel()
            for task in tasks:
                task.cancel()
            # A worker thread may still be inside next(source); then the generator closes when collected.
            with contextlib.suppress(ValueError):
                source.close()

    async def segment_frames(self, frames: Iterable[Frame], **options: Any) -> AsyncIterator[FrameResult]:
        """segment_video for frames the caller already has: numpy arrays (RGB) or PIL images."""
        async for result in self.segment_video(frames, **options):
            yield result

    async def model_info(self, timeout: float | None = None, model: str = "") -> pb.ModelInfo:
        """The model `model` (empty: the server's default) and its labels."""
        try:
            return await self._stub.GetModelInfo(pb.GetModelInfoRequest(model=model), timeout=timeout or self.timeout)
        except grpc.RpcError as exc:
            raise SegmentError.from_rpc_error(exc) from None

    async def list_models(self, timeout: float | None = None) -> list[pb.ModelStatus]:
        """Every model the server is configured with: name, architecture, state (READY...), is_default."""
        try:
            return list((await self._stub.ListModels(pb.ListModelsRequest(), timeout=timeout or self.timeout)).models)
        except grpc.RpcError as exc:
            raise SegmentError.from_rpc_error(exc) from None

    async def load_model(
        self, model: str, timeout: float | None = None, on_progress: Callable[[str], None] | None = None
    ) -> None:
        """Load (or reload, without a gap) the repository's model `model` on a server with SEGSERVE_MODEL_CONTROL,
        and wait for the outcome, as SegmentClient.load_model does: `timeout` bounds the wait, not the load
        (None: the client's timeout; math.inf: as long as it takes), and `on_progress(phase)` is called each
        time what the load is doing changes."""
        request = inference_pb.RepositoryModelLoadRequest(model_name=model)
        try:
            call = self._inference.RepositoryModelLoad(request, timeout=load_deadline(timeout, self.timeout))
            loading = asyncio.ensure_future(call)
            shown = ""
            while on_progress is not None and not loading.done():
                await asyncio.wait([loading], timeout=PROGRESS_POLL_S)
                phase = await self._load_phase(model) if not loading.done() else ""
                if phase and phase != shown:
                    on_progress(phase)
                    shown = phase
            await loading
        except grpc.RpcError as exc:
            raise SegmentError.from_rpc_error(exc) from None

    async def _load_phase(self, model: str) -> str:
        try:
            return load_phase(await self.list_models(timeout=PROGRESS_POLL_S * 5), model)
        except SegmentError:
            return ""

    async def unload_model(self, model: str, timeout: float | None = None) -> None:
        """Unload `model` once the requests it has are answered; new ones are refused (UNAVAILABLE)."""
        request = inference_pb.RepositoryModelUnloadRequest(model_name=model)
        try:
            await self._inference.RepositoryModelUnload(request, timeout=timeout or self.timeout)
        except grpc.RpcError as exc:
            raise SegmentError.from_rpc_error(exc) from None

    async def health(self, service: str = "", timeout: float | None = 5.0) -> str:
        try:
            response = await self._health.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout)
        except grpc.RpcError as exc:
            return health_of_refused_check(exc)
        return str(health_pb2.HealthCheckResponse.ServingStatus.Name(response.status))

    async def close(self) -> None:
        await self._channel.close(None)

    async def __aenter__(self) -> AsyncSegmentClient:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()
