"""The blocking client."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Generator, Iterable, Iterator
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
from client.resume import DEFAULT_RESUMES, ResumableRequests, Resumes, time_left
from client.security import control_metadata, open_channel, request_metadata
from protos.inference import grpc_predict_v2_pb2 as inference_pb
from protos.inference import grpc_predict_v2_pb2_grpc as inference_pb_grpc
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
        stream_resumes: int = DEFAULT_RESUMES,
    ) -> None:
        self.target = target
        self.timeout = timeout
        # A stream whose replica is lost (UNAVAILABLE) is resumed on a new call this many times in a row
        # (client/resume.py); 0: the stream fails as gRPC ends it.
        self.stream_resumes = stream_resumes
        self.upload_threshold = upload_threshold
        self._channel = channel or open_channel(target, credentials)
        self._stub = pb_grpc.SegmenterStub(self._channel)
        self._health = health_pb2_grpc.HealthStub(self._channel)
        self._inference = inference_pb_grpc.GRPCInferenceServiceStub(self._channel)

    def segment(
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
            response = method(call.request, timeout=timeout, metadata=request_metadata(request_id))
        return SegmentationResult.from_proto(response)

    def segment_many(
        self,
        images: Iterable[ImageInput],
        *,
        max_size: int = 0,
        overlay: bool = False,
        overlay_opacity: float | None = None,
        model: str = "",
        timeout: float | None = None,
        request_id: str | None = None,
    ) -> Iterator[SegmentationResult]:
        """Segment many images over one SegmentStream, yielding results as they arrive (any order).

        A failed image yields a result with `error` set; the others carry on. Ids are the file
        names for paths and "0", "1"... otherwise. Images above the upload threshold go through
        SegmentUpload after the stream.
        """
        options = Options(max_size, overlay, overlay_opacity, model)
        timeout = self.timeout if timeout is None else timeout
        deadline = None if timeout is None else time.monotonic() + timeout
        deferred: list[tuple[str, bytes | OSError]] = []
        source = stream_requests(images, options, self.upload_threshold, deferred)
        requests = ResumableRequests(lambda: next(source))
        resumes = Resumes(self.stream_resumes)
        while True:
            call = self._stub.SegmentStream(
                requests.attempt(), timeout=time_left(deadline), metadata=request_metadata(request_id)
            )
            try:
                for response in call:
                    requests.answered(response.id)
                    resumes.answer()
                    yield SegmentationResult.from_proto(response)
                break
            except grpc.RpcError as exc:
                # The replica was lost mid-stream: what it had not answered goes to another one.
                time.sleep(resumes.after(exc))  # or SegmentError, when the stream is not resumed
            finally:
                call.cancel()  # type: ignore[no-untyped-call]  # a no-op once the call ended; ends it when the caller stops early
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
                    model=model,
                    image_id=image_id,
                    timeout=timeout,
                )
            except SegmentError as exc:
                yield failed_result(image_id, exc)

    def segment_video(
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
    ) -> Generator[FrameResult]:
        """Segment a video file (any format FFmpeg reads) or an iterable of frames, yielding one FrameResult
        per frame, in frame order, over one SegmentStream.

        At most `window` frames are held at a time (sent and unanswered, or answered and waiting for an
        earlier one), so a long video never sits in memory. With `every` K > 1 only every K-th frame is
        sent; the frames in between reuse its mask (`reused` is True). A frame the server refuses yields
        a result with `error` set. `timeout` bounds the whole stream (None: no limit). A file that is not
        a video raises client.video.NotAVideoError.
        """
        window_ = FrameWindow(window, every, Options(max_size, model=model), frame_format)
        source = frame_source(path_or_frames)
        deadline = None if timeout is None else time.monotonic() + timeout
        changed = threading.Condition()
        stopped = threading.Event()
        failures: list[BaseException] = []  # of the call: end at once
        source_failures: list[BaseException] = []  # of the frames: raised after the frames already sent

        def pull() -> pb.SegmentRequest | None:
            # On gRPC's sending thread, after room() said yes: one frame held, its request if it is sent.
            try:
                index, frame = next(source)
            except StopIteration:
                source.close()
                raise
            except Exception as exc:
                source_failures.append(exc)
                source.close()
                raise StopIteration from None
            request = window_.request_for(index, frame)
            with changed:
                window_.hold(index, frame)
                changed.notify_all()
            return request

        def room(stale: Callable[[], bool]) -> bool:
            # Blocks while the window is full; a stale call's sender (the stream was resumed) gives up.
            with changed:
                changed.wait_for(lambda: not window_.full or stopped.is_set() or stale())
            if stopped.is_set():
                try:
                    source.close()  # the caller stopped: release the video file
                except ValueError:  # being read by another call's sender at this moment; it stops next
                    pass
                return False
            return not stale()

        requests = ResumableRequests(pull, room)
        calls: list[grpc.Call] = []

        def new_call() -> Any:
            call = self._stub.SegmentStream(
                requests.attempt(), timeout=time_left(deadline), metadata=request_metadata(request_id)
            )
            calls.append(call)
            with changed:
                changed.notify_all()  # wakes the stale call's sender, if any
            return call

        def read_answers() -> None:
            resumes = Resumes(self.stream_resumes)
            try:
                while True:
                    call = new_call()
                    try:
                        for response in call:
                            with changed:
                                window_.answer(response)
                                requests.answered(response.id)
                                changed.notify_all()
                            resumes.answer()
                        return
                    except grpc.RpcError as exc:
                        if stopped.is_set():
                            return
                        # The replica was lost mid-stream: the unanswered frames go to another one.
                        time.sleep(resumes.after(exc))  # or SegmentError, when the stream is not resumed
            except SegmentError as exc:
                failures.append(exc)
            finally:
                with changed:
                    window_.answers_done = True
                    changed.notify_all()

        # A reader of its own, which also opens the calls: with `every` > 1, frames become ready when taken
        # from the source, with no answer to wake a caller that waits on the stream.
        reader = threading.Thread(target=read_answers, name="segment-video-answers", daemon=True)
        reader.start()
        try:
            while True:
                with changed:
                    # A timeout so that Ctrl-C reaches a caller waiting here.
                    while not (window_.has_ready() or window_.answers_done or failures):
                        changed.wait(0.25)
                    ready = window_.pop_ready()
                    changed.notify_all()
                yield from ready
                if not ready and (window_.answers_done or failures):
                    break
            reader.join()
            if failures or source_failures:
                raise (failures or source_failures)[0]
            window_.check_complete()
        finally:
            stopped.set()
            for call in list(calls):
                call.cancel()  # type: ignore[no-untyped-call]
            with changed:
                changed.notify_all()

    def segment_frames(self, frames: Iterable[Frame], **options: Any) -> Generator[FrameResult]:
        """segment_video for frames the caller already has: numpy arrays (RGB) or PIL images."""
        return self.segment_video(frames, **options)

    def model_info(self, timeout: float | None = None, model: str = "") -> pb.ModelInfo:
        """The model `model` (empty: the server's default) and its labels."""
        with segment_errors():
            return self._stub.GetModelInfo(pb.GetModelInfoRequest(model=model), timeout=timeout or self.timeout)

    def list_models(self, timeout: float | None = None) -> list[pb.ModelStatus]:
        """Every model the server is configured with: name, architecture, state (READY...), is_default."""
        with segment_errors():
            return list((self._stub.ListModels(pb.ListModelsRequest(), timeout=timeout or self.timeout)).models)

    def load_model(
        self,
        model: str,
        timeout: float | None = None,
        on_progress: Callable[[str], None] | None = None,
        control_token: str | None = None,
    ) -> None:
        """Load (or reload, without a gap) the repository's model `model` on a server with SEGSERVE_MODEL_CONTROL,
        and wait for the outcome: returns once it serves, raises SegmentError with the reason it failed.

        `timeout` bounds the wait, not the load (None: the client's timeout; math.inf: as long as the load
        takes). A load is the server's job: one this wait gives up on (DEADLINE_EXCEEDED) goes on there, and
        list_models() shows how it ends. `on_progress(phase)` is called with what the load is doing ("measuring
        runtimes: ...", "warming up") each time that changes, read from ListModels every PROGRESS_POLL_S.
        `control_token`: the server's model-control token (None: SEGSERVE_CONTROL_TOKEN, or the token file a
        server on this host wrote for this user; client.security.control_token says where)."""
        request = inference_pb.RepositoryModelLoadRequest(model_name=model)
        with segment_errors():
            call = self._inference.RepositoryModelLoad.future(
                request, timeout=load_deadline(timeout, self.timeout), metadata=control_metadata(control_token)
            )
            ended = threading.Event()
            call.add_done_callback(lambda _: ended.set())
            shown = ""
            while on_progress is not None and not ended.wait(PROGRESS_POLL_S):
                phase = self._load_phase(model)
                if phase and phase != shown:
                    on_progress(phase)
                    shown = phase
            call.result()

    def _load_phase(self, model: str) -> str:
        """What the load of `model` is doing, as ListModels says; empty when it cannot tell."""
        try:
            return load_phase(self.list_models(timeout=PROGRESS_POLL_S * 5), model)
        except SegmentError:
            return ""

    def unload_model(self, model: str, timeout: float | None = None, control_token: str | None = None) -> None:
        """Unload `model` once the requests it has are answered; new ones are refused (UNAVAILABLE).
        `control_token`: as for load_model."""
        request = inference_pb.RepositoryModelUnloadRequest(model_name=model)
        with segment_errors():
            self._inference.RepositoryModelUnload(
                request, timeout=timeout or self.timeout, metadata=control_metadata(control_token)
            )

    def health(self, service: str = "", timeout: float | None = 5.0) -> str:
        """ "SERVING", "NOT_SERVING", ... ; raises SegmentError when the server cannot be reached."""
        try:
            response = self._health.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout)
        except grpc.RpcError as exc:
            return health_of_refused_check(exc)
        return str(health_pb2.HealthCheckResponse.ServingStatus.Name(response.status))

    def wait_until_serving(self, timeout: float = 60.0) -> None:
        """Blocks until the health service says SERVING; raises SegmentError on timeout."""
        deadline = time.monotonic() + timeout
        last = "no answer"
        while time.monotonic() < deadline:
            try:
                last = self.health(timeout=health_check_timeout(deadline))
                if last == "SERVING":
                    return
            except SegmentError as exc:
                last = str(exc)
            time.sleep(HEALTH_POLL_S)
        raise not_serving_in_time(self.target, timeout, last)

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> SegmentClient:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
