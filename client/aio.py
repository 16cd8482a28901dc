"""The asyncio client: SegmentClient's calls, awaitable, with the same parameters and the same meaning."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable, Iterable, Iterator
from types import TracebackType
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from client.channel import DEFAULT_TARGET
from client.errors import SegmentError, health_of_refused_check, not_serving_in_time, segment_errors
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
    HEALTH_POLL_S,
    PROGRESS_POLL_S,
    UPLOAD_THRESHOLD,
    ImageInput,
    Options,
    health_check_timeout,
    load_deadline,
    load_phase,
    single_call,
    stream_requests,
)
from client.results import SegmentationResult, failed_result, unreadable_result
from client.resume import DEFAULT_RESUMES, AsyncResumableRequests, Resumes, time_left
from client.security import control_metadata, open_aio_channel, request_metadata
from protos.inference import grpc_predict_v2_pb2 as inference_pb
from protos.inference import grpc_predict_v2_pb2_grpc as inference_pb_grpc
from protos.segserve.v1 import segserve_pb2 as pb
from protos.segserve.v1 import segserve_pb2_grpc as pb_grpc


class AsyncSegmentClient:
    """Talks to a segserve server from asyncio code. Use as an async context manager, or await close().

    >>> async with AsyncSegmentClient("localhost:50051") as client:
    ...     result = await client.segment("photo.jpg", overlay=True)
    ...     async for frame in client.segment_video("clip.mp4"):
    ...         frame.mask

    Every call takes SegmentClient's parameters, with its defaults and its meaning: the same timeouts, the
    same upload threshold, lost streams resumed as SegmentClient's are (`stream_resumes`, client/resume.py),
    the same SegmentError for a failed call. tests/client/ runs SegmentClient's tests against both.
    Where it differs, on purpose, because it is asyncio:
    - `channel` is a grpc.aio.Channel (a grpc.Channel cannot serve awaitable calls), created on the event
      loop that uses the client; the client closes it on close(), as SegmentClient closes its own.
    - close() is awaited; the client is an async context manager.
    - segment_many, segment_video and segment_frames are async iterators, and the streams read, decode and
      encode their images and frames in a worker thread, so the event loop stays free (SegmentClient does
      that on gRPC's sending thread).
    """

    def __init__(
        self,
        target: str = DEFAULT_TARGET,
        *,
        timeout: float | None = 60.0,
        upload_threshold: int = UPLOAD_THRESHOLD,
        channel: grpc.aio.Channel | None = None,
        credentials: grpc.ChannelCredentials | None = None,
        stream_resumes: int = DEFAULT_RESUMES,
    ) -> None:
        self.target = target
        self.timeout = timeout
        # A stream whose replica is lost (UNAVAILABLE) is resumed on a new call this many times in a row
        # (client/resume.py); 0: the stream fails as gRPC ends it.
        self.stream_resumes = stream_resumes
        self.upload_threshold = upload_threshold
        self._channel = channel or open_aio_channel(target, credentials)
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
        """Segment one image (bytes, a path or a PIL image); large ones go through SegmentUpload."""
        call = single_call(image, Options(max_size, overlay, overlay_opacity, model), image_id, self.upload_threshold)
        method: Any = self._stub.SegmentUpload if call.upload else self._stub.Segment
        timeout = self.timeout if timeout is None else timeout
        with segment_errors(call.image_id):
            response = await method(call.request, timeout=timeout, metadata=request_metadata(request_id))
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
        """As SegmentClient.segment_many: results in arrival order over one SegmentStream (resumed on another
        replica when its own is lost), failures as results with `error`, large images uploaded after it."""
        options = Options(max_size, overlay, overlay_opacity, model)
        timeout = self.timeout if timeout is None else timeout
        deadline = None if timeout is None else time.monotonic() + timeout
        deferred: list[tuple[str, bytes | OSError]] = []
        source = stream_requests(images, options, self.upload_threshold, deferred)

        async def pull() -> pb.SegmentRequest | None:
            request = await asyncio.to_thread(next, source, None)  # reads and encodes off the event loop
            if request is None:
                raise StopAsyncIteration
            return request

        requests = AsyncResumableRequests(pull)
        resumes = Resumes(self.stream_resumes)
        try:
            while True:
                call = self._stub.SegmentStream(
                    requests.attempt(), timeout=time_left(deadline), metadata=request_metadata(request_id)
                )
                try:
                    async for response in call:
                        requests.answered(response.id)
                        resumes.answer()
                        yield SegmentationResult.from_proto(response)
                    break
                except grpc.RpcError as exc:
                    # The replica was lost mid-stream: what it had not answered goes to another one.
                    await asyncio.sleep(resumes.after(exc))  # or SegmentError, when the stream is not resumed
                finally:
                    call.cancel()  # a no-op once the call ended; ends it when the caller stops early
        finally:
            requests.close()
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
        """As SegmentClient.segment_video: one FrameResult per frame, in frame order, over one SegmentStream
        (resumed on another replica when its own is lost), at most `window` frames held at a time.

        Reading, decoding and encoding frames run in a worker thread, so the event loop stays free.
        """
        window_ = FrameWindow(window, every, Options(max_size, model=model), frame_format)
        source = frame_source(path_or_frames)
        deadline = None if timeout is None else time.monotonic() + timeout
        changed = asyncio.Condition()
        failures: list[BaseException] = []  # of the call: end at once
        source_failures: list[BaseException] = []  # of the frames: raised after the frames already sent

        def next_request(frames: Iterator[tuple[int, Any]]) -> tuple[int, Any, pb.SegmentRequest | None] | None:
            item = next(frames, None)
            return None if item is None else (*item, window_.request_for(*item))

        async def pull() -> pb.SegmentRequest | None:
            # After room() said yes: one frame taken from the source and held; its request if it is sent.
            try:
                item = await asyncio.to_thread(next_request, source)
            except Exception as exc:
                source_failures.append(exc)
                raise StopAsyncIteration from None
            if item is None:
                raise StopAsyncIteration
            index, frame, request = item
            async with changed:
                window_.hold(index, frame)
                changed.notify_all()
            return request

        async def room(stale: Callable[[], bool]) -> bool:
            # Waits while the window is full; a stale call's sender (the stream was resumed) gives up.
            async with changed:
                await changed.wait_for(lambda: not window_.full or stale())
            return not stale()

        requests = AsyncResumableRequests(pull, room)
        calls: list[Any] = []

        async def read_answers() -> None:
            resumes = Resumes(self.stream_resumes)
            try:
                while True:
                    call = self._stub.SegmentStream(
                        requests.attempt(), timeout=time_left(deadline), metadata=request_metadata(request_id)
                    )
                    calls.append(call)
                    async with changed:
                        changed.notify_all()  # wakes the stale call's sender, if any
                    try:
                        async for response in call:
                            async with changed:
                                window_.answer(response)
                                requests.answered(response.id)
                                changed.notify_all()
                            resumes.answer()
                        return
                    except grpc.RpcError as exc:
                        # The replica was lost mid-stream: the unanswered frames go to another one.
                        await asyncio.sleep(resumes.after(exc))  # or SegmentError, when the stream is not resumed
            except SegmentError as exc:
                failures.append(exc)
            finally:
                async with changed:
                    window_.answers_done = True
                    changed.notify_all()

        # A reader of its own, which also opens the calls: with `every` > 1, frames become ready when taken
        # from the source, with no answer to wake a caller that waits on the stream.
        reader = asyncio.create_task(read_answers())
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
            await reader
            if failures or source_failures:
                raise (failures or source_failures)[0]
            window_.check_complete()
        finally:
            for call in calls:
                call.cancel()
            reader.cancel()
            requests.close()
            # A worker thread may still be inside next(source); then the generator closes when collected.
            with contextlib.suppress(ValueError):
                source.close()

    async def segment_frames(self, frames: Iterable[Frame], **options: Any) -> AsyncIterator[FrameResult]:
        """segment_video for frames the caller already has: numpy arrays (RGB) or PIL images."""
        async for result in self.segment_video(frames, **options):
            yield result

    async def model_info(self, timeout: float | None = None, model: str = "") -> pb.ModelInfo:
        """The model `model` (empty: the server's default) and its labels."""
        with segment_errors():
            return await self._stub.GetModelInfo(pb.GetModelInfoRequest(model=model), timeout=timeout or self.timeout)

    async def list_models(self, timeout: float | None = None) -> list[pb.ModelStatus]:
        """Every model the server is configured with: name, architecture, state (READY...), is_default."""
        with segment_errors():
            return list((await self._stub.ListModels(pb.ListModelsRequest(), timeout=timeout or self.timeout)).models)

    async def load_model(
        self,
        model: str,
        timeout: float | None = None,
        on_progress: Callable[[str], None] | None = None,
        control_token: str | None = None,
    ) -> None:
        """Load (or reload, without a gap) the repository's model `model` on a server with SEGSERVE_MODEL_CONTROL,
        and wait for the outcome, as SegmentClient.load_model does: `timeout` bounds the wait, not the load
        (None: the client's timeout; math.inf: as long as it takes), `on_progress(phase)` is called each
        time what the load is doing changes, and `control_token` is sent as SegmentClient's is."""
        request = inference_pb.RepositoryModelLoadRequest(model_name=model)
        with segment_errors():
            call = self._inference.RepositoryModelLoad(
                request, timeout=load_deadline(timeout, self.timeout), metadata=control_metadata(control_token)
            )
            loading = asyncio.ensure_future(call)
            shown = ""
            while on_progress is not None and not loading.done():
                await asyncio.wait([loading], timeout=PROGRESS_POLL_S)
                phase = await self._load_phase(model) if not loading.done() else ""
                if phase and phase != shown:
                    on_progress(phase)
                    shown = phase
            await loading

    async def _load_phase(self, model: str) -> str:
        try:
            return load_phase(await self.list_models(timeout=PROGRESS_POLL_S * 5), model)
        except SegmentError:
            return ""

    async def unload_model(self, model: str, timeout: float | None = None, control_token: str | None = None) -> None:
        """Unload `model` once the requests it has are answered; new ones are refused (UNAVAILABLE).
        `control_token`: as for load_model."""
        request = inference_pb.RepositoryModelUnloadRequest(model_name=model)
        with segment_errors():
            await self._inference.RepositoryModelUnload(
                request, timeout=timeout or self.timeout, metadata=control_metadata(control_token)
            )

    async def health(self, service: str = "", timeout: float | None = 5.0) -> str:
        """ "SERVING", "NOT_SERVING", ... ; raises SegmentError when the server cannot be reached."""
        try:
            response = await self._health.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout)
        except grpc.RpcError as exc:
            return health_of_refused_check(exc)
        return str(health_pb2.HealthCheckResponse.ServingStatus.Name(response.status))

    async def wait_until_serving(self, timeout: float = 60.0) -> None:
        """Waits until the health service says SERVING; raises SegmentError (DEADLINE_EXCEEDED) on timeout."""
        deadline = time.monotonic() + timeout
        last = "no answer"
        while time.monotonic() < deadline:
            try:
                last = await self.health(timeout=health_check_timeout(deadline))
                if last == "SERVING":
                    return
            except SegmentError as exc:
                last = str(exc)
            await asyncio.sleep(HEALTH_POLL_S)
        raise not_serving_in_time(self.target, timeout, last)

    async def close(self) -> None:
        await self._channel.close(None)

    async def __aenter__(self) -> AsyncSegmentClient:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()
