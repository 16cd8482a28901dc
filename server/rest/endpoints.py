"""The HTTP door's endpoints: each parses its request (bodies, converters), makes one call of the data plane
(server/dataplane/) and serialises the answer; errors are mapped in server/rest/routes.py, in one place."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from server.dataplane import DataPlane
from server.inference.protocol import EXTENSIONS, server_version
from server.operations.tracing import trace_settings
from server.rest import converters
from server.rest.bodies import IMAGE_TYPES, JSON_TYPE, MULTIPART_OVERHEAD, multipart_file, read_body, segment_options
from server.rest.errors import UnsupportedMediaType

INDEX_BODY_LIMIT = 64 * 1024
PARSE_ON_LOOP_BYTES = 64 * 1024
"""JSON up to this size is parsed on the event loop (well under a millisecond); bigger goes to a worker
(DataPlane.off_loop). Repository and control bodies stay under INDEX_BODY_LIMIT, so they parse in place."""


class Endpoints:
    def __init__(self, plane: DataPlane) -> None:
        self.plane = plane

    # ---- health and metadata ------------------------------------------------------------------------------

    async def server_metadata(self, request: Request) -> Response:
        return JSONResponse({"name": "segserve", "version": server_version(), "extensions": list(EXTENSIONS)})

    async def live(self, request: Request) -> Response:
        return JSONResponse({"live": True})

    async def ready(self, request: Request) -> Response:
        ready = self.plane.ready
        return JSONResponse({"ready": ready}, status_code=200 if ready else 503)

    @staticmethod
    def _named(request: Request) -> tuple[str, str]:
        return request.path_params["model"], request.path_params.get("version", "")

    async def model_metadata(self, request: Request) -> Response:
        return JSONResponse(converters.metadata_to_http(self.plane.describe(*self._named(request))))

    async def model_ready(self, request: Request) -> Response:
        ready = self.plane.model_ready(*self._named(request))
        return JSONResponse({"name": request.path_params["model"], "ready": ready}, status_code=200 if ready else 503)

    async def model_config(self, request: Request) -> Response:
        return JSONResponse(converters.config_to_http(self.plane.describe(*self._named(request))))

    async def model_statistics(self, request: Request) -> Response:
        name, version = self._named(request) if "model" in request.path_params else ("", "")  # /v2/models/stats
        reports = self.plane.statistics(name, version)
        return JSONResponse({"model_stats": [converters.statistics_to_json(report) for report in reports]})

    async def repository_index(self, request: Request) -> Response:
        self.plane.check_index_access(request.headers.get("authorization"))  # before reading the body
        body = await read_body(self.plane, request, INDEX_BODY_LIMIT, "a repository index request")
        parsed = converters.parse_json(body) if body else {}
        ready_only = isinstance(parsed, dict) and parsed.get("ready") is True
        index = self.plane.index(ready_only, request.headers.get("authorization"))
        return JSONResponse(converters.index_to_http(index))

    # ---- model control ------------------------------------------------------------------------------------
    # Under TLS with client certificates, uvicorn's handshake requires one of every caller (ssl.CERT_REQUIRED).

    async def _control_parameters(self, request: Request) -> dict[str, object]:
        self.plane.check_control(request.headers.get("authorization"))  # before reading the body
        body = await read_body(self.plane, request, INDEX_BODY_LIMIT, "a repository request")
        parsed = converters.parse_json(body) if body else {}
        parameters = parsed.get("parameters", {}) if isinstance(parsed, dict) else None
        if not isinstance(parameters, dict):
            raise converters.BadBody("the body must be a JSON object, with an optional `parameters` object")
        return parameters

    async def load_model(self, request: Request) -> Response:
        parameters = await self._control_parameters(request)
        await self.plane.load(request.path_params["model"], parameters, request.headers.get("authorization"))
        return JSONResponse({})

    async def unload_model(self, request: Request) -> Response:
        parameters = await self._control_parameters(request)
        await self.plane.unload(request.path_params["model"], parameters, request.headers.get("authorization"))
        return JSONResponse({})

    # ---- inference ----------------------------------------------------------------------------------------

    async def infer(self, request: Request) -> Response:
        self.plane.describe(*self._named(request))  # the model is known: before reading a byte of the body
        header = request.headers.get(converters.HEADER_LENGTH)
        content_type = request.headers.get("content-type", JSON_TYPE).split(";")[0].strip().lower()
        if header is None and content_type not in (JSON_TYPE, ""):
            raise UnsupportedMediaType(
                f"Content-Type {content_type[:64]} is not taken here: send {JSON_TYPE}, or the binary tensor "
                "extension with Inference-Header-Content-Length"
            )
        header_length = None
        if header is not None:
            if not (header.isascii() and header.isdigit()):
                raise converters.BadBody(f"Inference-Header-Content-Length must be a byte count, got {header[:32]!r}")
            header_length = int(header)
        what = "an infer request (SEGSERVE_MAX_MESSAGE_BYTES)"
        body = await read_body(self.plane, request, self.plane.max_message_bytes, what)
        name, version = self._named(request)
        parse, args = converters.request_from_http, (name, version, body, header_length, self.plane.max_image_bytes)
        json_bytes = len(body) if header_length is None else header_length  # what takes time is JSON's
        infer_request, binary = (
            await self.plane.off_loop(parse, *args) if json_bytes > PARSE_ON_LOOP_BYTES else parse(*args)
        )
        del body
        response = await self.plane.infer(infer_request)
        content, json_length = converters.response_to_http(response, binary)
        if json_length is None:
            return Response(content, media_type=JSON_TYPE)
        headers = {"Inference-Header-Content-Length": str(json_length)}
        return Response(content, media_type="application/octet-stream", headers=headers)

    async def segment(self, request: Request) -> Response:
        options = segment_options(request)

        async def read_image() -> bytes:  # called by the data plane once the model has taken the options
            content_type = request.headers.get("content-type", "application/octet-stream").lower()
            limit = self.plane.max_image_bytes
            if content_type.startswith("multipart/form-data"):
                what = "an image upload (SEGSERVE_MAX_IMAGE_BYTES)"
                body = await read_body(self.plane, request, limit + MULTIPART_OVERHEAD, what)
                return await multipart_file(request, body)
            if content_type.startswith(IMAGE_TYPES):
                return await read_body(self.plane, request, limit, "an image (SEGSERVE_MAX_IMAGE_BYTES)")
            raise UnsupportedMediaType(
                f"Content-Type {content_type.split(';')[0][:64]} is not an image: send the image as the body "
                "(image/* or application/octet-stream) or as a multipart file"
            )

        result = await self.plane.segment("", read_image, options, None)
        if JSON_TYPE in request.headers.get("accept", ""):
            return JSONResponse(converters.segment_result_to_json(result))
        return Response(result.mask_png, media_type="image/png")

    # ---- Triton's trace extension -------------------------------------------------------------------------

    async def trace_setting(self, request: Request) -> Response:
        """GET answers the trace settings, POST changes them first (server/operations/tracing.py says which
        are taken). Values as Triton's HTTP API writes them: trace_level a list, the others one string each;
        null sets a setting back to its value at start-up."""
        update: dict[str, list[str]] | None = None
        if request.method == "POST":
            body = await read_body(self.plane, request, INDEX_BODY_LIMIT, "a trace setting request")
            parsed = converters.parse_json(body) if body else {}
            if not isinstance(parsed, dict):
                raise converters.BadBody("the body must be a JSON object of trace settings")
            update = {key: _setting_values(key, value) for key, value in parsed.items()}
        settings = trace_settings(update, request.path_params.get("model", ""))
        return JSONResponse({k: v if k == "trace_level" else v[0] for k, v in settings.items()})


def _setting_values(key: str, value: object) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str | int) and not isinstance(value, bool):
        return [str(value)]
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return value
    raise converters.BadBody(f"trace setting {key[:64]!r}: a string, a list of strings or null")
