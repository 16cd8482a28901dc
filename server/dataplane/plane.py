"""The data plane: the one transport-free API every door calls (gRPC's Segmenter and inference services, the
HTTP app). A door parses its message into the values here, makes one call, serialises the answer and maps a
SegservError to its protocol's status; everything between is this module's: admission, the model's lookup,
byte budgets (checked before anything is allocated), the drain, statistics and the call's access record.
So a bound placed here holds on every door, and the doors cannot disagree on what they count.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from typing import Any, Protocol, TypeVar

import grpc
from opentelemetry.trace import Tracer

from server.core.allocator import give_back_freed_memory
from server.core.buffers import UploadHold
from server.core.model_pipeline import ModelPipeline
from server.core.pipeline import SegmentationPipeline
from server.core.stream_window import STREAM_WINDOW, Place, StreamWindow, serve_stream
from server.core.types import ResolvedOptions, SegmentOptions, SegmentResult
from server.dataplane.control_token import check_token, control_token
from server.dataplane.inference import InferenceModels, counted_request
from server.dataplane.types import ByteHold, IndexEntry, ModelInfo, SegmentCall, StatisticsReport, UploadChunk
from server.errors import (
    ImageTooLarge,
    InvalidImage,
    InvalidOptions,
    NotPermitted,
    NotReady,
    SegservError,
    UploadStalled,
    without_server_paths,
)
from server.inference.protocol import UNLOAD_PARAMETERS, InferRequest, InferResponse, ModelDescription
from server.inference.protocol import check_control_parameters as check_parameters
from server.models.control import ModelControl
from server.models.registry import ModelEntry
from server.operations.access import ImageNote, note_image
from server.operations.tracing import tracer_if_on

log = logging.getLogger(__name__)

M = TypeVar("M")  # a door's request message
M_contra = TypeVar("M_contra", contravariant=True)
T = TypeVar("T")  # what the data plane makes of it
T_co = TypeVar("T_co", covariant=True)
V = TypeVar("V")  # the data plane's answer
V_contra = TypeVar("V_contra", contravariant=True)
A = TypeVar("A")  # the door's answer message


class StreamCodec(Protocol[M_contra, T_co, V_contra, A]):
    """How a door's stream messages become the data plane's values and back. `parse` runs inside the item,
    so a request that cannot be parsed is answered with its error and the stream goes on."""

    def size(self, message: M_contra) -> int: ...

    def request_id(self, message: M_contra) -> str: ...

    def parse(self, message: M_contra) -> T_co: ...

    def answer(self, request_id: str, value: V_contra) -> A: ...

    def error(self, request_id: str, error: SegservError) -> A: ...

    def answer_size(self, answer: A) -> int: ...


class DataPlane:
    """Every operation of every door, over one pipeline (which owns the workers, the models and the bounds)."""

    def __init__(self, pipeline: SegmentationPipeline, control: ModelControl[ModelPipeline] | None = None) -> None:
        self.pipeline = pipeline
        self._inference = InferenceModels(pipeline, control)
        self.control = self._inference.control
        # While model control is on, its calls (and the repository index) take a token (control_token.py).
        self._control_token = control_token(pipeline.settings) if self.control.enabled else None

    # ---- readiness and the drain ------------------------------------------------------------

    @property
    def ready(self) -> bool:
        """Started (at least one model loaded) and not draining: the server's readiness on every door."""
        return self._inference.ready

    def refuse_new_call(self) -> None:
        """Raises the refusal a new call should hear now (shutting down, still loading, queue full), if any.
        A stream is refused whole, before any answer, so that its client retries it on another replica."""
        self.pipeline.admit().release()

    @property
    def max_image_bytes(self) -> int:
        return self.pipeline.limits.max_bytes

    @property
    def max_message_bytes(self) -> int:
        return self.pipeline.settings.max_message_bytes

    # ---- Segment, SegmentUpload, SegmentStream, POST /v1/segment ----------------------------

    async def segment(
        self,
        request_id: str,
        image: bytes | Callable[[], Awaitable[bytes]],
        options: SegmentOptions,
        deadline: float | None,
    ) -> SegmentResult:
        """One encoded image through the model its options name, whichever door it came by: the model held,
        the options resolved against it, the request admitted, then counted in the model's statistics and
        noted in the call's access record. `image`: its bytes, or what reads them (an HTTP body), called once
        the model has taken the options, so that options it refuses are refused before a byte is read."""
        with self.pipeline.models.acquire(options.model) as model:
            resolved = model.resolve(options)
            if not isinstance(image, bytes):
                image = await image()
            with self.pipeline.admit():
                return await self._one_image(request_id, model, image, resolved, deadline)

    @staticmethod
    async def _one_image(
        request_id: str, model: ModelPipeline, image: bytes, options: ResolvedOptions, deadline: float | None
    ) -> SegmentResult:
        """One image as one request of its model's statistics and of the call's access record. The caller
        holds the model and the image's queue place."""
        with counted_request(model, request_id) as answered:
            answered.append(await model.segment(image, options, deadline))
        return answered[0]

    async def segment_upload(
        self, next_chunk: Callable[[], Awaitable[UploadChunk | None]], deadline: float | None
    ) -> tuple[str, SegmentResult]:
        """An image sent in chunks: admitted and given room in the upload budget before its first chunk is
        read (a refused caller's bytes are never copied), its model held from the first chunk (an unload
        waits for the upload rather than refuse it late), every chunk counted in the budget as it comes and
        refused past the image size limit without reading the rest. Returns the request id and the result."""
        try:
            with self.pipeline.admit(), self.pipeline.uploads.hold() as hold:
                hold.check_room()
                first = await self._within_idle(next_chunk())
                if first is None:
                    raise InvalidImage("upload had no chunks")
                request_id, options = first.request_id, first.options or SegmentOptions()
                with self.pipeline.models.acquire(options.model) as model:
                    resolved = model.resolve(options)
                    image = await self._receive_upload(first, next_chunk, hold)
                    del first
                    try:
                        return request_id, await self._one_image(request_id, model, image, resolved, deadline)
                    except BaseException:
                        image = b""  # not kept alive by the refusal's traceback
                        raise
        finally:
            give_back_freed_memory()  # the upload's chunks and joined image are gone by now

    async def _receive_upload(
        self, first: UploadChunk, next_chunk: Callable[[], Awaitable[UploadChunk | None]], hold: UploadHold
    ) -> bytes:
        limit = self.pipeline.limits.max_bytes
        # Kept as the chunks came and joined once at the end: a buffer grown chunk by chunk saves that
        # final copy, but its reallocations fragment the heap under many slow uploads (docs/operations.md).
        received: list[bytes] = []
        size = 0
        chunk: UploadChunk | None = first
        try:
            while chunk is not None:
                if chunk is not first and (chunk.request_id or chunk.options is not None):
                    raise InvalidOptions("id and options belong on the first chunk only")
                data = chunk.data
                chunk = None
                if size + len(data) > limit:
                    # Refuse now, without reading (and buffering) the rest of the upload.
                    raise ImageTooLarge(f"upload passed {limit} bytes, the image size limit")
                hold.add(len(data))
                received.append(data)
                size += len(data)
                del data
                chunk = await self._within_idle(next_chunk())
            return b"".join(received)
        finally:
            received.clear()  # not left to whoever keeps this frame alive (a refusal's traceback)

    async def _within_idle(self, read: Awaitable[T], what: str = "upload stalled: no chunk") -> T:
        """The caller's next piece of a body, or UploadStalled once none came for the idle timeout: a
        sender that stops mid-body never holds its bytes (nor its place) for good, on any door."""
        idle = self.pipeline.settings.upload_idle_timeout_s
        try:
            return await asyncio.wait_for(read, idle)
        except TimeoutError:
            raise UploadStalled(
                f"{what} for {idle:g} s (SEGSERVE_UPLOAD_IDLE_TIMEOUT_S); its bytes were freed"
            ) from None

    async def read_body(self, chunks: AsyncIterator[bytes], limit: int, what: str, declared: int | None) -> bytes:
        """A request body (HTTP), refused as soon as it passes `limit`: by its declared length before reading,
        or while it arrives; never buffered past the limit. While it arrives it counts against the upload
        budget shared with SegmentUpload (SEGSERVE_UPLOAD_BUDGET_BYTES), and a body that stalls is ended
        after the same idle timeout as an upload, its bytes given back."""
        if declared is not None and declared > limit:
            raise ImageTooLarge(f"the body is {declared} bytes; {what} takes at most {limit}")
        received: list[bytes] = []
        size = 0
        with self.pipeline.uploads.hold() as hold:
            hold.check_room()
            try:
                while True:
                    try:
                        chunk = await self._within_idle(anext(chunks), "body stalled: no bytes")
                    except StopAsyncIteration:
                        break
                    size += len(chunk)
                    if size > limit:
                        raise ImageTooLarge(f"the body passed {limit} bytes, the most {what} takes")
                    hold.add(len(chunk))
                    received.append(chunk)
                return b"".join(received)
            finally:
                received.clear()

    _parsing = ThreadPoolExecutor(max_workers=1, thread_name_prefix="parse")
    """One thread for every door's parsing, shared by the process's data planes (made on first use)."""

    async def off_loop(self, work: Callable[..., T], *args: Any) -> T:
        """`work(*args)` off the event loop, for a door's parsing of a big body: parsing JSON of megabytes held
        the loop long enough that gRPC health waited meanwhile (docs/performance.md, 'Figures behind the code's
        comments'). One body at a time, on one thread: json.loads holds the GIL for a whole body in one C call,
        so the loop (and gRPC's threads, which need the GIL to hand it a call) can wait for that call to end; two
        parsed at once made them wait for both in turn, and parsing is no faster on more threads while it holds
        the GIL."""
        return await asyncio.get_running_loop().run_in_executor(self._parsing, work, *args)

    def segment_stream(
        self,
        read: Callable[[], Awaitable[M | None]],
        codec: StreamCodec[M, SegmentCall, SegmentResult, A],
        deadline: float | None,
    ) -> AsyncGenerator[A, None]:
        """SegmentStream: each image answered as soon as it is ready; a failed image is answered with its
        error and the stream goes on. Each image holds its queue place until its answer has been sent."""

        async def work(place: Place[A], call: SegmentCall) -> SegmentResult:
            # A stream that was open when the drain began is an admitted call: it is served to its end.
            place.admission = self.pipeline.admit(admitted_before_drain=True)
            with self.pipeline.models.acquire(call.options.model) as model:
                resolved = model.resolve(call.options)
                return await self._one_image(call.request_id, model, call.image, resolved, deadline)

        return self._stream(read, codec, work, ordered=False)

    # ---- the model repository and the Segmenter's model calls -------------------------------

    def list_models(self) -> list[ModelEntry]:
        """Every model with its state; reasons as a caller may read them (no server paths)."""
        return [replace(e, reason=without_server_paths(e.reason)) for e in self.pipeline.models.entries()]

    def model_info(self, name: str) -> ModelInfo:
        """A model's settings, runtime and labels; while the server starts, the default model's settings
        with "loading" for what is not known yet."""
        pipeline = self.pipeline
        if not pipeline.ready and not name:
            s = pipeline.settings
            return ModelInfo(
                model=s.model,
                max_size=s.max_size,
                max_batch_size=s.max_batch_size,
                max_batch_delay_ms=s.max_batch_delay_ms,
                max_queue=s.max_queue,
                batch_sizes=tuple(pipeline.batch_size_counts),
            )
        model = pipeline.models.get(name)
        own = model.settings
        runtime = model.runtime
        return ModelInfo(
            model=model.config.architecture,
            name=model.name,
            is_default=model.name == pipeline.models.default_name,
            weights=without_server_paths(runtime.facts.weights_description) if runtime else "loading",
            device=runtime.device_name if runtime else "loading",
            runtime=runtime.description if runtime else "loading",
            max_size=own.max_size,
            max_batch_size=own.max_batch_size,
            max_batch_delay_ms=own.max_batch_delay_ms,
            max_queue=pipeline.settings.max_queue,
            batch_sizes=tuple(model.batch_size_counts),
            labels=model.labels,
            weights_are_trained=bool(runtime and runtime.facts.weights_trained),
            resident_bytes=model.resident_bytes,
        )

    def check_index_access(self, authorization: str | None) -> None:
        """Refuses (UNAUTHENTICATED) the repository index to a caller without the control token while model
        control is on; a door whose request has a body calls it before reading the body."""
        if self._control_token is not None:
            check_token(self._control_token, authorization)

    def index(self, ready_only: bool = False, authorization: str | None = None) -> list[IndexEntry]:
        """The repository index (Triton's model-repository group): while model control is on, for callers with
        the control token only. Reasons as a caller may read them (no server paths)."""
        self.check_index_access(authorization)
        return [replace(e, reason=without_server_paths(e.reason)) for e in self._inference.index(ready_only)]

    def model_ready(self, name: str, version: str = "") -> bool:
        try:
            model = self._inference.known(name, version)
        except NotReady:  # known, and failed to load
            return False
        return self._inference.model_ready(model)

    def describe(self, name: str, version: str = "") -> ModelDescription:
        """What ModelMetadata and ModelConfig say of a model (in any state: they are answered while it loads)."""
        return self._inference.describe(self._inference.known(name, version))

    def statistics(self, name: str = "", version: str = "") -> list[StatisticsReport]:
        """Triton's statistics: of one model, or of every loaded model for an empty name."""
        if not name:
            return self._inference.every_statistics_report()
        return [self._inference.statistics_report(self._inference.known(name, version))]

    async def load(
        self, name: str, parameters: Mapping[str, object], authorization: str | None, client_certified: bool = True
    ) -> None:
        """Loads (or reloads) a repository model: with model control on, the control token, and under TLS with
        client certificates, a certified caller."""
        self.check_control(authorization, client_certified)
        check_parameters(parameters, ())
        await self.control.load(name)

    async def unload(
        self, name: str, parameters: Mapping[str, object], authorization: str | None, client_certified: bool = True
    ) -> None:
        self.check_control(authorization, client_certified)
        check_parameters(parameters, UNLOAD_PARAMETERS)
        await self.control.unload(name)

    def check_control(self, authorization: str | None, client_certified: bool = True) -> None:
        """Refuses a model-control call: model control off (FAILED_PRECONDITION), no or another control token
        (UNAUTHENTICATED), or under TLS with client certificates a caller without one (PERMISSION_DENIED; the
        handshake already requires it of every caller then: this holds even if that ever changes). Doors call
        it before reading a request body."""
        self.control.check_enabled()
        assert self._control_token is not None  # made whenever control is enabled
        check_token(self._control_token, authorization)
        if self.pipeline.settings.tls_client_ca and not client_certified:
            raise NotPermitted("loading and unloading models takes a client certificate")

    # ---- the Open Inference Protocol's inference --------------------------------------------

    async def infer(
        self, request: InferRequest, deadline: float | None = None, admitted_before_drain: bool = False
    ) -> InferResponse:
        """One ModelInfer (N images, admitted whole): counted in the model's statistics, each image noted in
        the call's access record."""
        return await self._inference.infer(request, deadline, admitted_before_drain)

    def infer_stream(
        self,
        read: Callable[[], Awaitable[M | None]],
        codec: StreamCodec[M, InferRequest, InferResponse, A],
        deadline: float | None,
    ) -> AsyncGenerator[A, None]:
        """ModelStreamInfer: each request answered in the order it came, up to a window of them in progress at
        once (so frames share batches); a failed request is answered with its error and the stream goes on."""

        async def work(place: Place[A], request: InferRequest) -> InferResponse:
            # A stream open when the drain began is an admitted call: it is served to its end.
            return await self._inference.infer(request, deadline, admitted_before_drain=True)

        return self._stream(read, codec, work, ordered=True)

    # ---- what the HTTP door's responses hold --------------------------------------------------

    def check_room_for_response(self, what: str) -> None:
        """Refuses (RESOURCE_EXHAUSTED) a call whose answer would weigh megabytes while the stream budget is
        full of answers callers have not read."""
        budget = self.pipeline.stream_bytes
        if budget.full():
            raise budget.refusal(what)

    def response_bytes(self) -> ByteHold:
        """A call's hold on the stream budget for the bytes of its answer while they are being sent."""
        return self.pipeline.stream_bytes.stream()

    # ---- the stream engine's use ----------------------------------------------------------------

    def _stream(
        self,
        read: Callable[[], Awaitable[M | None]],
        codec: StreamCodec[M, T, V, A],
        work: Callable[[Place[A], T], Awaitable[V]],
        ordered: bool,
    ) -> AsyncGenerator[A, None]:
        pipeline = self.pipeline
        if pipeline.draining:
            self.refuse_new_call()
        # Never more than the queue admits, so a lone stream is never refused for its own items.
        window: StreamWindow[A] = StreamWindow(
            min(STREAM_WINDOW, pipeline.settings.max_queue), pipeline.streams, pipeline.stream_bytes.stream(), ordered
        )

        async def answer(place: Place[A], message: M, refusal: BaseException | None) -> A:
            request_id = codec.request_id(message)
            try:
                if refusal is not None:
                    raise refusal
                return codec.answer(request_id, await work(place, codec.parse(message)))
            except SegservError as exc:
                note_image(ImageNote(request_id, code=exc.code.name))
                return codec.error(request_id, SegservError(without_server_paths(exc.message), exc.code))
            except Exception:
                log.exception("unexpected error in stream item %r", request_id)
                note_image(ImageNote(request_id, code=grpc.StatusCode.INTERNAL.name))
                return codec.error(request_id, SegservError("internal error; see the server log"))

        tracer = tracer_if_on("segserve.dataplane")  # asked once a stream; None (no span work) when tracing is off
        step = answer if tracer is None else _traced_item(tracer, answer, codec.request_id)
        return serve_stream(window, read, codec.size, step, codec.answer_size)


def _traced_item(
    tracer: Tracer, answer: Callable[[Place[A], M, BaseException | None], Awaitable[A]], request_id: Callable[[M], str]
) -> Callable[[Place[A], M, BaseException | None], Awaitable[A]]:
    """A stream's item inside its own "stream item" span, a child of the stream's call."""

    async def traced(place: Place[A], message: M, refusal: BaseException | None) -> A:
        with tracer.start_as_current_span("stream item", attributes={"segserve.request_id": request_id(message)}):
            return await answer(place, message, refusal)

    return traced
