"""The gRPC interceptor: opens each call's access record (server/operations/access.py) on arrival and closes it with
the call's status.

It wraps each handler, so it sees the call from arrival to answer, its status (OK, aborted, cancelled by
the caller, past its deadline) and the request id from the caller's `x-request-id` metadata (one is made up
when absent, and sent back in the trailing metadata). It also counts segserve's own calls for the drain, and,
with tracing on (server/operations/tracing.py), opens each call's span: the caller's trace continued from its
`traceparent` metadata, current while the handler runs (so the data plane's and the core's spans are its
children, and the access line carries its ids).
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AbstractContextManager
from typing import Any

import grpc
from opentelemetry import trace
from opentelemetry.trace import SpanKind, StatusCode

from server.operations import tracing
from server.operations.access import REQUEST_ID_KEY, STREAM_METHODS, record_call, start_record
from server.operations.drain import CallTracker
from server.operations.metrics import Metrics

_PROTOCOL_OF_SERVICE = {"/segserve.": "segmenter-grpc", "/inference.": "inference-grpc"}
# Health watches stay open as long as a client's channel does; a drain must not wait for them.
_NOT_DRAINED = ("/grpc.health.", "/grpc.reflection.")
DEADLINE_SLACK_S = 0.25
# The codes OpenTelemetry's conventions count as the server's failure (the others are the caller's doing).
_SERVER_ERRORS = ("UNKNOWN", "DEADLINE_EXCEEDED", "UNIMPLEMENTED", "INTERNAL", "UNAVAILABLE", "DATA_LOSS")

Context = grpc.aio.ServicerContext[Any, Any]


def _request_id(context: Context) -> str:
    for key, value in context.invocation_metadata() or ():
        if key == REQUEST_ID_KEY and value:
            return str(value)
    return ""  # start_record makes one up


def _code_name(code: object) -> str:
    if isinstance(code, grpc.StatusCode):
        return code.name
    if isinstance(code, int):
        return next((c.name for c in grpc.StatusCode if c.value[0] == code), "UNKNOWN")
    return "OK"


class _Call:
    """One call being observed: started on arrival, finished with its status."""

    def __init__(
        self, metrics: Metrics, method: str, context: Context, calls: CallTracker | None, traced: bool = False
    ) -> None:
        self.metrics = metrics
        self.traced = traced
        self.calls = calls if not method.startswith(_NOT_DRAINED) else None
        self.method = method
        self.short = method.rsplit("/", 1)[-1]
        self.context = context
        self.record = start_record(_request_id(context))
        self.started = time.monotonic()
        self.code = "OK"
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
        logged = protocol == "segmenter-grpc" or self.short in STREAM_METHODS or self.short == "ModelInfer"
        if self.traced:
            span = trace.get_current_span()
            span.set_attribute("segserve.request_id", self.record.request_id)
            span.set_attribute("rpc.grpc.status_code", grpc.StatusCode[self.code].value[0])
            if self.code in _SERVER_ERRORS:
                span.set_status(StatusCode.ERROR, self.code)
        record_call(self.metrics, protocol or "other-grpc", self.short, self.code, elapsed, self.record, logged)


class ObservingInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[type-arg]  # generic only in the stubs
    def __init__(self, metrics: Metrics, calls: CallTracker | None = None) -> None:
        self.metrics = metrics
        self.calls = calls
        self.tracer = tracing.tracer_if_on("segserve.grpc")
        """None when tracing is off: then no span, and no look at the caller's trace context."""

    def _span(self, method: str, context: Context) -> AbstractContextManager[Any]:
        """The call's span (kind SERVER, named service/method as OpenTelemetry's RPC conventions name it), in the
        caller's trace when its metadata carries one; none for health and reflection, nor when tracing is off."""
        if self.tracer is None or method.startswith(_NOT_DRAINED):
            return contextlib.nullcontext()
        carrier = {key: value for key, value in context.invocation_metadata() or () if isinstance(value, str)}
        service, _, name = method.lstrip("/").partition("/")
        return self.tracer.start_as_current_span(
            method.lstrip("/"),
            context=tracing.extract(carrier),
            kind=SpanKind.SERVER,
            attributes={"rpc.system": "grpc", "rpc.service": service, "rpc.method": name},
            record_exception=False,  # an abort is an answer, not an exception; the status says how it ended
            set_status_on_exception=False,
        )

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
        traced = self.tracer is not None

        async def observed(request: Any, context: Context) -> Any:
            with self._span(method, context), _Call(self.metrics, method, context, self.calls, traced):
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

        traced = self.tracer is not None

        async def observed(request: Any, context: Context) -> None:
            with self._span(method, context), _Call(self.metrics, method, context, self.calls, traced):
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
