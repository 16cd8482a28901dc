"""Per-call observation: Prometheus metrics and one structured log line per call.

The interceptor wraps each handler, so it sees the call from arrival to answer, its status (OK,
aborted, cancelled by the caller, past its deadline) and the request id from the caller's
`x-request-id` metadata (one is made up when absent, and sent back in the trailing metadata).
The servicer adds what only it knows (image size, batch size, stage times) through `note_image`,
which writes to the current call's record through a context variable.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import grpc

from server.drain import CallTracker
from server.metrics import Metrics

if TYPE_CHECKING:
    from server.pipeline import SegmentResult

log = logging.getLogger("segserve.access")

REQUEST_ID_KEY = "x-request-id"
_PROTOCOL_OF_SERVICE = {"/segserve.": "segmenter-grpc", "/inference.": "inference-grpc"}
# Health watches stay open as long as a client's channel does; a drain must not wait for them.
_NOT_DRAINED = ("/grpc.health.", "/grpc.reflection.")
_SINGLE_IMAGE_METHODS = ("Segment", "SegmentUpload")
_STREAM_METHODS = ("SegmentStream", "ModelStreamInfer")
DEADLINE_SLACK_S = 0.25

Context = grpc.aio.ServicerContext[Any, Any]


@dataclass
class ImageNote:
    image_id: str
    width: int = 0
    height: int = 0
    batch_size: int = 0
    code: str = "OK"
    stages_ms: dict[str, float] = field(default_factory=dict)
    model: str = ""
    """The model that answered (empty when the image was refused before a model was found)."""


@dataclass
class CallRecord:
    request_id: str
    images: list[ImageNote] = field(default_factory=list)


_current: ContextVar[CallRecord | None] = ContextVar("segserve_call", default=None)


def current_request_id() -> str:
    record = _current.get()
    return record.request_id if record else ""


def note_image(note: ImageNote) -> None:
    """Called by the servicer for each image answered (or failed inside a stream)."""
    record = _current.get()
    if record is not None:
        record.images.append(note)


def note_result(request_id: str, result: SegmentResult) -> None:
    """An image answered, with its size, batch and stage times."""
    t = result.timing
    stages = {
        "preprocess": t.preprocess_ms,
        "queue": t.queue_ms,
        "inference": t.inference_ms,
        "postprocess": t.postprocess_ms,
    }
    note_image(ImageNote(request_id, result.width, result.height, t.batch_size, "OK", stages, result.model))


def _request_id(context: Context) -> str:
    for key, value in context.invocation_metadata() or ():
        if key == REQUEST_ID_KEY and value:
            return str(value)[:128]
    return uuid.uuid4().hex


def _code_name(code: object) -> str:
    if isinstance(code, grpc.StatusCode):
        return code.name
    if isinstance(code, int):
        return next((c.name for c in grpc.StatusCode if c.value[0] == code), "UNKNOWN")
    return "OK"


class _Call:
    """One call being observed: started on arrival, finished with its status."""

    def __init__(self, metrics: Metrics, method: str, context: Context, calls: CallTracker | None) -> None:
        self.metrics = metrics
        self.calls = calls if not method.startswith(_NOT_DRAINED) else None
        self.method = method
        self.short = method.rsplit("/", 1)[-1]
        self.context = context
        self.record = CallRecord(_request_id(context))
        self.started = time.monotonic()
        self.code = "OK"
        _current.set(self.record)
        context.set_trailing_metadata(((REQUEST_ID_KEY, self.record.request_id),))
        metrics.in_progress.labels(self.short).inc()
        if self.calls is not None:
            self.calls.arrived()

    def __enter__(self) -> _Call:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: object) -> None:
        if exc is not None:
            self.failed(exc)
        self.finish()

    def failed(self, exc: BaseException) -> None:
        if isinstance(exc, asyncio.CancelledError):
            # The caller's clock runs out a moment before ours (the deadline travels as a timeout), and its
            # cancellation arrives first: a call cancelled this close to its deadline ran out of time.
            remaining = self.context.time_remaining()
            near_deadline = remaining is not None and remaining <= DEADLINE_SLACK_S
            self.code = "DEADLINE_EXCEEDED" if near_deadline else "CANCELLED"
        elif isinstance(exc, grpc.aio.AbortError):
            self.code = _code_name(self.context.code())
        else:
            self.code = "UNKNOWN"

    def finish(self) -> None:
        if self.code == "OK":
            self.code = _code_name(self.context.code())
        elapsed = time.monotonic() - self.started
        self.metrics.in_progress.labels(self.short).dec()
        if self.calls is not None:
            self.calls.left()
        protocol = next((p for prefix, p in _PROTOCOL_OF_SERVICE.items() if self.method.startswith(prefix)), None)
        # Segmenter calls and inference calls get the log line; health probes, metadata and reflection do not.
        logged = protocol == "segmenter-grpc" or self.short in _STREAM_METHODS or self.short == "ModelInfer"
        record_call(self.metrics, protocol or "other-grpc", self.short, self.code, elapsed, self.record, logged)


def record_call(
    metrics: Metrics, protocol: str, method: str, code: str, elapsed: float, record: CallRecord, logged: bool
) -> None:
    """A finished call into the metrics, and (when `logged`) its one log line; for every protocol."""
    m = metrics
    m.requests.labels(method, code).inc()
    m.protocol_requests.labels(protocol, code).inc()
    m.latency.labels(method).observe(elapsed)
    images = record.images
    if not images and method in _SINGLE_IMAGE_METHODS:
        m.images.labels(code).inc()  # refused before the servicer could note it
    for note in images:
        m.images.labels(note.code).inc()
        if note.model:
            m.model_images.labels(note.model, note.code).inc()
        for stage, ms in note.stages_ms.items():
            m.stage.labels(stage).observe(ms / 1000)
    if not logged:
        return  # health checks and reflection: counted, not logged
    line: dict[str, object] = {"request_id": record.request_id, "protocol": protocol, "method": method}
    if len(images) == 1 and method not in _STREAM_METHODS:
        note = images[0]
        line.update(image_id=note.image_id[:128], width=note.width, height=note.height, batch_size=note.batch_size)
        if note.model:
            line.update(model=note.model)
    elif images:
        line.update(images=len(images), failed_images=sum(n.code != "OK" for n in images))
        models = sorted({n.model for n in images if n.model})
        if models:
            line.update(models=models)
    line.update(ms=round(elapsed * 1000, 1), status=code)
    log.info("%s", json.dumps(line))


def start_record(request_id: str) -> CallRecord:
    """A call's record, current for note_image in this task (the HTTP door's counterpart of the interceptor)."""
    record = CallRecord(request_id[:128] if request_id else uuid.uuid4().hex)
    _current.set(record)
    return record


class ObservingInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[type-arg]  # generic only in the stubs
    def __init__(self, metrics: Metrics, calls: CallTracker | None = None) -> None:
        self.metrics = metrics
        self.calls = calls

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any]]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any]:
        handler = await continuation(handler_call_details)
        if handler is None:
            return handler
        method = str(handler_call_details.method)
        kind = (handler.request_streaming, handler.response_streaming)
        behaviour = {
            (False, False): handler.unary_unary,
            (True, False): handler.stream_unary,
            (False, True): handler.unary_stream,
            (True, True): handler.stream_stream,
        }[kind]
        wrapped: Callable[..., Any]
        if inspect.isasyncgenfunction(behaviour):
            wrapped = self._wrap_generator(method, behaviour)
        elif inspect.iscoroutinefunction(behaviour):
            wrapped = self._wrap_coroutine(method, behaviour)
        else:
            return handler  # a synchronous handler; none of ours
        make = {
            (False, False): grpc.unary_unary_rpc_method_handler,
            (True, False): grpc.stream_unary_rpc_method_handler,
            (False, True): grpc.unary_stream_rpc_method_handler,
            (True, True): grpc.stream_stream_rpc_method_handler,
        }[kind]
        return make(
            wrapped,
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )

    def _wrap_coroutine(self, method: str, behaviour: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
        async def observed(request: Any, context: Context) -> Any:
            with _Call(self.metrics, method, context, self.calls):
                return await behaviour(request, context)

        return observed

    def _wrap_generator(
        self, method: str, behaviour: Callable[..., AsyncIterator[Any]]
    ) -> Callable[..., Awaitable[None]]:
        """A response-streaming handler becomes a coroutine that writes each response itself, so that
        (1) the handler is resumed only once its last response has been written (streams count a
        response as sent only then), (2) a write that fails because the caller has gone ends the call
        as CANCELLED here, rather than as an error logged with a traceback inside gRPC, and (3) the
        handler's cleanup runs at once, not whenever its generator is collected."""

        async def observed(request: Any, context: Context) -> None:
            with _Call(self.metrics, method, context, self.calls):
                responses = behaviour(request, context)
                try:
                    async for response in responses:
                        try:
                            await context.write(response)
                        except Exception:
                            raise asyncio.CancelledError from None  # the call is over: nobody to write to
                finally:
                    await responses.aclose()  # type: ignore[attr-defined]  # an async generator

        return observed
