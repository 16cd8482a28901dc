"""ASGI middleware of the HTTP door: response bytes counted in the stream budget, trailing slashes."""

from __future__ import annotations

from collections.abc import Callable

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from server.dataplane import ByteHold


class CountedResponses:
    """A response body counts against the stream budget (SEGSERVE_STREAM_BUDGET_BYTES) while it is being
    sent. uvicorn's send returns once the socket has taken most of it, so a caller that does not read its
    response holds those bytes here, where new requests see them (refused 429 while the budget is full) as
    they see a stalled stream's. `hold`: a new hold on the budget (DataPlane.response_bytes)."""

    def __init__(self, app: ASGIApp, hold: Callable[[], ByteHold]) -> None:
        self.app = app
        self.hold = hold

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        held = self.hold()

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
    """A path and the same path with a trailing slash are one endpoint, served alike. The published
    specification names server metadata `GET /v2/` and Triton's documents `GET v2`; Starlette would answer one
    of them with a 307 redirect, which clients that do not follow redirects take for a failure."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "")
        if scope["type"] == "http" and len(path) > 1 and path.endswith("/"):
            scope = {**scope, "path": path.rstrip("/") or "/"}
        await self.app(scope, receive, send)
