"""The HTTP front door (Starlette): Open Inference Protocol REST under /v2, and POST /v1/segment for curl.

Thin: a body read within its limit, rest_converters, server.inference.protocol or the pipeline, a response. Errors
become HTTP statuses here, in one place, with a JSON body {"error": one sentence}; never a traceback.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
from starlette.applications import Starlette
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from server.core.buffers import UploadBudget
from server.core.model_pipeline import ModelPipeline
from server.core.stream_bytes import StreamBudget
from server.core.types import SegmentOptions
from server.errors import ImageTooLarge, InvalidOptions, NotReady, Overloaded, SegservError, TooManyImages
from server.inference.protocol import (
    EXTENSIONS,
    MODEL_VERSION,
    UNLOAD_PARAMETERS,
    InferenceModels,
    check_control_parameters,
    note_response,
    server_version,
)
from server.operations.access import REQUEST_ID_KEY, ImageNote, note_image, record_call, start_record
from server.operations.drain import CallTracker
from server.operations.metrics import Metrics
from server.rest import converters as converters

log = logging.getLogger(__name__)

Handler = Callable[[Request], Awaitable[Response]]

_STATUS_OF_CODE = {
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.UNIMPLEMENTED: 501,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
    grpc.StatusCode.CANCELLED: 499,
    grpc.StatusCode.FAILED_PRECONDITION: 400,
    grpc.StatusCode.PERMISSION_DENIED: 403,
    # What is left of RESOURCE_EXHAUSTED once images and the queue are matched: a load past the model limits.
    grpc.StatusCode.RESOURCE_EXHAUSTED: 409,
}
_CODE_OF_STATUS = {400: "INVALID_ARGUMENT", 404: "NOT_FOUND", 405: "UNIMPLEMENTED", 413: "RESOURCE_EXHAUSTED"}
# The body is the image: image/*, octet-stream, and curl's default for --data-binary (a form encoding by name only).
IMAGE_TYPES = ("image/", "application/octet-stream", "application/x-www-form-urlencoded")
JSON_TYPE = "application/json"
INDEX_BODY_LIMIT = 64 * 1024


class BodyTooLarge(ImageTooLarge):
    """A body over its limit, refused before it is read whole."""


class UnsupportedMediaType(InvalidOptions):
    """A Content-Type the endpoint does not take."""


def http_status(error: SegservError) -> int:
    if isinstance(error, ImageTooLarge | TooManyImages):
        return 413
    if isinstance(error, Overloaded):
        return 429
    if isinstance(error, UnsupportedMediaType):
        return 415
    if isinstance(error, NotReady):
        return 503
    return _STATUS_OF_CODE.get(error.code, 500)


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


async def read_body(request: Request, limit: int, what: str, budget: UploadBudget) -> bytes:
    """The body, refused (413) as soon as it passes `limit`: by its Content-Length before reading, or while
    reading a chunked one; never buffered past the limit. While it arrives it counts against the upload
    budget shared with SegmentUpload (SEGSERVE_UPLOAD_BUDGET_BYTES), so slow senders cannot hold more."""
    encoding = request.headers.get("content-encoding", "identity").lower()
    if encoding != "identity":
        raise UnsupportedMediaType(f"Content-Encoding {encoding} is not taken; send the body uncompressed")
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise BodyTooLarge(f"the body is {declared} bytes; {what} takes at most {limit}")
    chunks: list[bytes] = []
    size = 0
    with budget.hold() as hold:
        hold.check_room()
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise BodyTooLarge(f"the body passed {limit} bytes, the most {what} takes")
            hold.add(len(chunk))
            chunks.append(chunk)
        return b"".join(chunks)


def _int_query(request: Request, name: str) -> int:
    value = request.query_params.get(name)
    if value is None:
        return 0
    try:
        return int(value)
    except ValueError:
        raise InvalidOptions(f"query parameter {name} must be an integer, got {value!r}") from None


def _segment_options(request: Request) -> SegmentOptions:
    query = request.query_params
    opacity = query.get("overlay_opacity")
    try:
        overlay_opacity = None if opacity is None else float(opacity)
    except ValueError:
        raise InvalidOptions(f"query parameter overlay_opacity must be a number, got {opacity!r}") from None
    overlay = query.get("overlay", "false").lower() in ("1", "true", "yes")
    return SegmentOptions(
        max_size=_int_query(request, "max_size"),
        overlay=overlay,
        overlay_opacity=overlay_opacity,
        model=query.get("model", ""),
    )


class RestApp:
    """The routes over the served models; `app` is the ASGI application."""

    def __init__(self, models: InferenceModels, metrics: Metrics | None, calls: CallTracker | None = None) -> None:
        self.models = models
        self.pipeline = models.pipeline
        self.metrics = metrics
        self.calls = calls
        m = "/v2/models/{model}"
        v = m + "/versions/{version}"
        routes = [
            ("/v2", "GET", "ServerMetadata", self.server_metadata),
            ("/v2/health/live", "GET", "ServerLive", self.live),
            ("/v2/health/ready", "GET", "ServerReady", self.ready),
            ("/v2/repository/index", "POST", "RepositoryIndex", self.repository_index),
            ("/v2/repository/models/{model}/load", "POST", "RepositoryModelLoad", self.load_model),
            ("/v2/repository/models/{model}/unload", "POST", "RepositoryModelUnload", self.unload_model),
            ("/v2/models/stats", "GET", "ModelStatistics", self.model_statistics),  # before /v2/models/{model}
            *[(p, "GET", "ModelMetadata", self.model_metadata) for p in (m, v)],
            *[(p + "/ready", "GET", "ModelReady", self.model_ready) for p in (m, v)],
            *[(p + "/config", "GET", "ModelConfig", self.model_config) for p in (m, v)],
            *[(p + "/stats", "GET", "ModelStatistics", self.model_statistics) for p in (m, v)],
            *[(p + "/infer", "POST", "ModelInfer", self.infer) for p in (m, v)],
            ("/v1/segment", "POST", "Segment", self.segment),
        ]
        self.app = Starlette(
            routes=[
                Route(path, self._observed(name, path, handler), methods=[verb]) for path, verb, name, handler in routes
            ],
            exception_handlers={HTTPException: self._http_exception, Exception: self._unexpected},
        )

    # ---- one place for errors, metrics and the log line ----------------------------------------------------

    def _observed(self, name: str, path: str, handler: Handler) -> Handler:
        protocol = "segment-http" if path.startswith("/v1/") else "inference-http"

        # Probes are not what a drain waits for (a kubelet polls them all through it).
        calls = self.calls if name not in ("ServerLive", "ServerReady") else None
        # Calls whose answers weigh megabytes wait behind responses their callers have not read.
        heavy = name in ("ModelInfer", "Segment")

        async def observed(request: Request) -> Response:
            started = time.monotonic()
            record = start_record(request.headers.get(REQUEST_ID_KEY, ""))
            if calls is not None:
                calls.arrived()
            try:
                if heavy and self.pipeline.stream_bytes.full():
                    raise self.pipeline.stream_bytes.refusal("this HTTP request")
                response = await handler(request)
                code = "OK"
            except SegservError as exc:
                response, code = _error(http_status(exc), exc.message), exc.code.name
            except Exception:
                log.exception("unexpected error in %s", path)
                response, code = _error(500, "internal error; see the server log"), "INTERNAL"
            finally:
                if calls is not None:
                    calls.left()
            response.headers[REQUEST_ID_KEY] = record.request_id
            if self.metrics is not None:
                logged = name in ("ModelInfer", "Segment")
                record_call(self.metrics, protocol, f"http {name}", code, time.monotonic() - started, record, logged)
            return response

        return observed

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
            code = _CODE_OF_STATUS.get(status, "UNKNOWN")
            record_call(self.metrics, "other-http", "http unrouted", code, 0.0, record, False)
        response = _error(status, str(detail))
        response.headers.update(headers)
        return response

    async def _unexpected(self, request: Request, exc: Exception) -> Response:
        log.error("unexpected error in %s", request.url.path, exc_info=exc)
        return _error(500, "internal error; see the server log")

    # ---- health and metadata ------------------------------------------------------------------------------

    async def server_metadata(self, request: Request) -> Response:
        return JSONResponse({"name": "segserve", "version": server_version(), "extensions": list(EXTENSIONS)})

    async def live(self, request: Request) -> Response:
        return JSONResponse({"live": True})

    async def ready(self, request: Request) -> Response:
        ready = self.models.ready
        return JSONResponse({"ready": ready}, status_code=200 if ready else 503)

    def _model(self, request: Request) -> ModelPipeline:
        return self.models.known(request.path_params["model"], request.path_params.get("version", ""))

    async def model_metadata(self, request: Request) -> Response:
        return JSONResponse(converters.metadata_to_http(self._model(request)))

    async def model_ready(self, request: Request) -> Response:
        name = request.path_params["model"]
        try:
            ready = self.models.model_ready(self._model(request))
        except NotReady:  # known, and failed to load
            ready = False
        return JSONResponse({"name": name, "ready": ready}, status_code=200 if ready else 503)

    async def model_config(self, request: Request) -> Response:
        return JSONResponse(converters.config_to_http(self._model(request)))

    async def model_statistics(self, request: Request) -> Response:
        if "model" in request.path_params:
            return JSONResponse({"model_stats": [self.models.statistics_report(self._model(request))]})
        return JSONResponse({"model_stats": self.models.every_statistics_report()})  # /v2/models/stats

    async def repository_index(self, request: Request) -> Response:
        body = await read_body(request, INDEX_BODY_LIMIT, "a repository index request", self.pipeline.uploads)
        parsed = converters.parse_json(body) if body else {}
        ready_only = isinstance(parsed, dict) and parsed.get("ready") is True
        draining = self.pipeline.draining
        index = []
        for entry in self.models.index(ready_only):
            item = {"name": entry.name, "version": MODEL_VERSION, "state": "UNAVAILABLE" if draining else entry.state}
            if entry.reason:
                item["reason"] = entry.reason
            index.append(item)
        return JSONResponse(index)

    # ---- model control ------------------------------------------------------------------------------------
    # Under TLS with client certificates, uvicorn's handshake requires one of every caller (ssl.CERT_REQUIRED).

    async def _control_parameters(self, request: Request, allowed: tuple[str, ...]) -> None:
        self.models.control.check_enabled()
        body = await read_body(request, INDEX_BODY_LIMIT, "a repository request", self.pipeline.uploads)
        parsed = converters.parse_json(body) if body else {}
        parameters = parsed.get("parameters", {}) if isinstance(parsed, dict) else None
        if not isinstance(parameters, dict):
            raise converters.BadBody("the body must be a JSON object, with an optional `parameters` object")
        check_control_parameters(parameters, allowed)

    async def load_model(self, request: Request) -> Response:
        await self._control_parameters(request, ())
        await self.models.control.load(request.path_params["model"])
        return JSONResponse({})

    async def unload_model(self, request: Request) -> Response:
        await self._control_parameters(request, UNLOAD_PARAMETERS)
        await self.models.control.unload(request.path_params["model"])
        return JSONResponse({})

    # ---- inference ----------------------------------------------------------------------------------------

    async def infer(self, request: Request) -> Response:
        self._model(request)  # before reading a byte of the body
        limit = self.pipeline.settings.max_message_bytes
        header = request.headers.get(converters.HEADER_LENGTH)
        content_type = request.headers.get("content-type", JSON_TYPE).split(";")[0].strip().lower()
        if header is None and content_type not in (JSON_TYPE, ""):
            raise UnsupportedMediaType(
                f"Content-Type {content_type} is not taken here: send {JSON_TYPE}, or the binary tensor "
                "extension with Inference-Header-Content-Length"
            )
        header_length = None
        if header is not None:
            if not header.isdigit():
                raise converters.BadBody(f"Inference-Header-Content-Length must be a byte count, got {header!r}")
            header_length = int(header)
        body = await read_body(request, limit, "an infer request (SEGSERVE_MAX_MESSAGE_BYTES)", self.pipeline.uploads)
        infer_request, binary = converters.request_from_http(
            request.path_params["model"],
            request.path_params.get("version", ""),
            body,
            header_length,
            self.pipeline.limits.max_bytes,
        )
        del body
        response = await self.models.infer(infer_request)
        note_response(infer_request.id, response)
        content, json_length = converters.response_to_http(response, binary)
        if json_length is None:
            return Response(content, media_type=JSON_TYPE)
        headers = {"Inference-Header-Content-Length": str(json_length)}
        return Response(content, media_type="application/octet-stream", headers=headers)

    async def segment(self, request: Request) -> Response:
        options = _segment_options(request)
        self.pipeline.check_options(options)
        content_type = request.headers.get("content-type", "application/octet-stream").lower()
        limit = self.pipeline.limits.max_bytes
        if content_type.startswith("multipart/form-data"):
            body = await read_body(
                request, limit + 64 * 1024, "an image upload (SEGSERVE_MAX_IMAGE_BYTES)", self.pipeline.uploads
            )
            image = await _multipart_file(request, body)
        elif content_type.startswith(IMAGE_TYPES):
            image = await read_body(request, limit, "an image (SEGSERVE_MAX_IMAGE_BYTES)", self.pipeline.uploads)
        else:
            raise UnsupportedMediaType(
                f"Content-Type {content_type.split(';')[0]} is not an image: send the image as the body "
                "(image/* or application/octet-stream) or as a multipart file"
            )
        try:
            result = await self.pipeline.segment(image, options)
        except SegservError as exc:
            note_image(ImageNote("", code=exc.code.name))
            raise
        t = result.timing
        stages = {"preprocess": t.preprocess_ms, "queue": t.queue_ms, "inference": t.inference_ms}
        note_image(ImageNote("", result.width, result.height, t.batch_size, "OK", stages))
        if JSON_TYPE in request.headers.get("accept", ""):
            return JSONResponse(converters.segment_result_to_json(result))
        return Response(result.mask_png, media_type="image/png")


async def _multipart_file(request: Request, body: bytes) -> bytes:
    """The one file of a multipart body already read (and so bounded)."""
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if sent:
            return {"type": "http.disconnect"}
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    bounded = Request(request.scope, replay)
    try:
        async with bounded.form(max_files=1, max_fields=8) as form:
            files = [value for value in form.values() if isinstance(value, UploadFile)]
            if not files:
                raise InvalidOptions("the multipart body has no file; send the image as -F file=@photo.jpg")
            data: bytes = await files[0].read()
            return data
    except HTTPException as exc:
        raise InvalidOptions(f"the multipart body cannot be read: {exc.detail}") from None


class CountedResponses:
    """ASGI middleware: a response body counts against the stream budget (SEGSERVE_STREAM_BUDGET_BYTES) while
    it is being sent. uvicorn's send returns once the socket has taken most of it, so a caller that does not
    read its response holds those bytes here, where new requests see them (refused 429 while the budget is
    full) as they see a stalled stream's."""

    def __init__(self, app: ASGIApp, budget: StreamBudget) -> None:
        self.app = app
        self.budget = budget

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        held = self.budget.stream()

        async def counted_send(message: Message) -> None:
            size = len(message.get("body", b"")) if message["type"] == "http.response.body" else 0
            held.add(size)
            try:
                await send(message)
            finally:
                held.remove(size)

        try:
            await self.app(scope, receive, counted_send)
        finally:
            held.release()


class TrailingSlashes:
    """ASGI middleware: a path and the same path with a trailing slash are one endpoint, served alike. The
    published specification names server metadata `GET /v2/` and Triton's documents `GET v2`; Starlette would
    answer one of them with a 307 redirect, which clients that do not follow redirects take for a failure."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "")
        if scope["type"] == "http" and len(path) > 1 and path.endswith("/"):
            scope = {**scope, "path": path.rstrip("/") or "/"}
        await self.app(scope, receive, send)


def build_app(models: InferenceModels, metrics: Metrics | None, calls: CallTracker | None = None) -> Any:
    return TrailingSlashes(CountedResponses(RestApp(models, metrics, calls).app, models.pipeline.stream_bytes))
