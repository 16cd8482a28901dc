"""Reading an HTTP request's parts: its body (bounded, through the data plane's budget and idle timeout), a
multipart file, the query parameters of POST /v1/segment."""

from __future__ import annotations

from collections.abc import AsyncIterator

from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.types import Message

from server.core.types import SegmentOptions
from server.dataplane import DataPlane
from server.errors import InvalidOptions, RequestCancelled
from server.rest.errors import UnsupportedMediaType

JSON_TYPE = "application/json"
# The body is the image: image/*, octet-stream, and curl's default for --data-binary (a form encoding by name only).
IMAGE_TYPES = ("image/", "application/octet-stream", "application/x-www-form-urlencoded")
MULTIPART_OVERHEAD = 64 * 1024
"""What a multipart body may hold beyond its file: boundaries, part headers, a few small fields."""


def declared_length(request: Request) -> int | None:
    """Content-Length as a byte count, None when absent; refused (400) when it is no plain decimal number."""
    value = request.headers.get("content-length")
    if value is None:
        return None
    if not (value.isascii() and value.isdigit()):
        raise InvalidOptions(f"Content-Length must be a byte count, got {value[:32]!r}")
    return int(value)


async def read_body(plane: DataPlane, request: Request, limit: int, what: str) -> bytes:
    """The body, within `limit` bytes, counted in the upload budget while it arrives and ended if it stalls
    (DataPlane.read_body). A caller that hangs up mid-body is a cancellation, never a server error."""
    encoding = request.headers.get("content-encoding", "identity").lower()
    if encoding != "identity":
        raise UnsupportedMediaType(f"Content-Encoding {encoding[:32]} is not taken; send the body uncompressed")

    async def chunks() -> AsyncIterator[bytes]:
        try:
            async for chunk in request.stream():
                if chunk:
                    yield chunk
        except ClientDisconnect:
            raise RequestCancelled("the caller hung up before sending its whole body") from None

    return await plane.read_body(chunks(), limit, what, declared_length(request))


def _int_query(request: Request, name: str) -> int:
    value = request.query_params.get(name)
    if value is None:
        return 0
    try:
        return int(value)
    except ValueError:
        raise InvalidOptions(f"query parameter {name} must be an integer, got {value[:32]!r}") from None


def segment_options(request: Request) -> SegmentOptions:
    """POST /v1/segment's options, from its query string."""
    query = request.query_params
    opacity = query.get("overlay_opacity")
    try:
        overlay_opacity = None if opacity is None else float(opacity)
    except ValueError:
        shown = (opacity or "")[:32]
        raise InvalidOptions(f"query parameter overlay_opacity must be a number, got {shown!r}") from None
    overlay = query.get("overlay", "false").lower() in ("1", "true", "yes")
    return SegmentOptions(
        max_size=_int_query(request, "max_size"),
        overlay=overlay,
        overlay_opacity=overlay_opacity,
        model=query.get("model", ""),
    )


async def multipart_file(request: Request, body: bytes) -> bytes:
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
