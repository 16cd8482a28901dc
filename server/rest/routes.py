"""The HTTP front door (Starlette): the Open Inference Protocol's REST routes under /v2, and POST /v1/segment
for curl. Each route is an endpoint (server/rest/endpoints.py) wrapped once here for what every call shares:
the error mapping (server/rest/errors.py), the access record, metrics and log line, the drain's count and, with
tracing on (server/operations/tracing.py), the call's span in the caller's trace (its `traceparent` header)."""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
from opentelemetry.trace import SpanKind, StatusCode, Tracer
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from server.dataplane import DataPlane
from server.errors import SegservError, without_server_paths
from server.operations.access import REQUEST_ID_KEY, record_call, start_record
from server.operations.drain import CallTracker
from server.operations.metrics import Metrics
from server.operations.tracing import extract, tracer_if_on
from server.rest.endpoints import Endpoints
from server.rest.errors import CODE_OF_STATUS, error_response, http_status
from server.rest.middleware import CountedResponses, TrailingSlashes

log = logging.getLogger(__name__)

Handler = Callable[[Request], Awaitable[Response]]

PROBES = ("ServerLive", "ServerReady")
"""Not what a drain waits for: a kubelet polls them all through it."""
HEAVY = ("ModelInfer", "Segment")
"""Calls whose answers weigh megabytes: they wait behind responses their callers have not read."""


class RestApp:
    """The routes over the data plane; `app` is the ASGI application."""

    def __init__(self, plane: DataPlane, metrics: Metrics | None, calls: CallTracker | None = None) -> None:
        self.plane = plane
        self.metrics = metrics
        self.calls = calls
        e = Endpoints(plane)
        m = "/v2/models/{model}"
        v = m + "/versions/{version}"
        routes = [
            ("/v2", "GET", "ServerMetadata", e.server_metadata),
            ("/v2/health/live", "GET", "ServerLive", e.live),
            ("/v2/health/ready", "GET", "ServerReady", e.ready),
            ("/v2/repository/index", "POST", "RepositoryIndex", e.repository_index),
            ("/v2/repository/models/{model}/load", "POST", "RepositoryModelLoad", e.load_model),
            ("/v2/repository/models/{model}/unload", "POST", "RepositoryModelUnload", e.unload_model),
            ("/v2/models/stats", "GET", "ModelStatistics", e.model_statistics),  # before /v2/models/{model}
            *[(p, "GET", "ModelMetadata", e.model_metadata) for p in (m, v)],
            *[(p + "/ready", "GET", "ModelReady", e.model_ready) for p in (m, v)],
            *[(p + "/config", "GET", "ModelConfig", e.model_config) for p in (m, v)],
            *[(p + "/stats", "GET", "ModelStatistics", e.model_statistics) for p in (m, v)],
            *[(p + "/infer", "POST", "ModelInfer", e.infer) for p in (m, v)],
            ("/v1/segment", "POST", "Segment", e.segment),
            *[("/v2/trace/setting", verb, "TraceSetting", e.trace_setting) for verb in ("GET", "POST")],
            *[(m + "/trace/setting", verb, "TraceSetting", e.trace_setting) for verb in ("GET", "POST")],
        ]
        self.tracer = tracer_if_on("segserve.rest")
        """None when tracing is off: then no span, and no look at the caller's trace context."""
        self.app = Starlette(
            routes=[
                Route(path, self._observed(name, path, handler), methods=[verb]) for path, verb, name, handler in routes
            ],
            exception_handlers={HTTPException: self._http_exception, Exception: self._unexpected},
        )

    def _observed(self, name: str, path: str, handler: Handler) -> Handler:
        protocol = "segment-http" if path.startswith("/v1/") else "inference-http"
        calls = self.calls if name not in PROBES else None
        heavy = name in HEAVY

        async def observed(request: Request) -> Response:
            started = time.monotonic()
            record = start_record(request.headers.get(REQUEST_ID_KEY, ""))
            if calls is not None:
                calls.arrived()
            try:
                if heavy:
                    self.plane.check_room_for_response("this HTTP request")
                response = await handler(request)
                code = "OK"
            except SegservError as exc:
                response, code = error_response(http_status(exc), without_server_paths(exc.message)), exc.code.name
                if exc.code == grpc.StatusCode.UNAUTHENTICATED:
                    response.headers["WWW-Authenticate"] = 'Bearer realm="segserve model control"'  # RFC 6750
            except Exception:
                log.exception("unexpected error in %s", path)
                response, code = error_response(500, "internal error; see the server log"), "INTERNAL"
            finally:
                if calls is not None:
                    calls.left()
            response.headers[REQUEST_ID_KEY] = record.request_id
            if self.metrics is not None:
                logged = name in HEAVY
                record_call(self.metrics, protocol, f"http {name}", code, time.monotonic() - started, record, logged)
            return response

        return observed if self.tracer is None else self._traced(self.tracer, name, path, observed)

    @staticmethod
    def _traced(tracer: Tracer, name: str, path: str, observed: Handler) -> Handler:
        """`observed` inside the call's span (kind SERVER, "VERB /route" as OpenTelemetry's HTTP conventions name
        it), continuing the caller's trace; current while the endpoint runs and while the access line is written."""

        async def traced(request: Request) -> Response:
            with tracer.start_as_current_span(
                f"{request.method} {path}",
                context=extract(request.headers),
                kind=SpanKind.SERVER,
                attributes={"http.request.method": request.method, "http.route": path, "segserve.call": name},
            ) as span:
                response = await observed(request)
                span.set_attribute("http.response.status_code", response.status_code)
                span.set_attribute("segserve.request_id", response.headers.get(REQUEST_ID_KEY, ""))
                if response.status_code >= 500:
                    span.set_status(StatusCode.ERROR)
                return response

        return traced

    async def _http_exception(self, request: Request, exc: Exception) -> Response:
        status = exc.status_code if isinstance(exc, HTTPException) else 500
        detail = exc.detail if isinstance(exc, HTTPException) else "error"
        headers: dict[str, str] = {}
        if status == 404:
            detail = f"no such endpoint: {request.method} {request.url.path}"
        elif status == 405:
            # RFC 9110 15.5.6: a 405 names the methods the resource takes, in Allow.
            given = exc.headers if isinstance(exc, HTTPException) and exc.headers else {}
            allowed = sorted(m.strip() for m in given.get("Allow", "").split(",") if m.strip())
            headers["Allow"] = ", ".join(allowed)
            detail = f"{request.method} is not allowed on {request.url.path}; it takes {headers['Allow']}"
        if self.metrics is not None:
            record = start_record("")
            code = CODE_OF_STATUS.get(status, "UNKNOWN")
            record_call(self.metrics, "other-http", "http unrouted", code, 0.0, record, False)
        response = error_response(status, str(detail))
        response.headers.update(headers)
        return response

    async def _unexpected(self, request: Request, exc: Exception) -> Response:
        log.error("unexpected error in %s", request.url.path, exc_info=exc)
        return error_response(500, "internal error; see the server log")


def build_app(plane: DataPlane, metrics: Metrics | None, calls: CallTracker | None = None) -> Any:
    return TrailingSlashes(CountedResponses(RestApp(plane, metrics, calls).app, plane.response_bytes))
