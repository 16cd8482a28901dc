"""Either client behind SegmentClient's blocking interface, so that one test judges both.

`SyncOverAsync` runs an AsyncSegmentClient on an event loop of its own thread: each awaitable call is
awaited there and its result handed back; each async iterator becomes a plain iterator, one `__anext__`
at a time, and is closed (`aclose`) when the caller stops early, as a sync generator would be. Several
threads may call it at once (their calls run side by side on the one loop), as they may SegmentClient.
It adds no behaviour of its own: what a test sees is the async client's.
"""

from __future__ import annotations

import asyncio
import inspect
import threading
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator
from typing import Any, TypeVar

import grpc

from client import AsyncSegmentClient, SegmentClient
from client.channel import channel_options

T = TypeVar("T")
KINDS = ("sync", "async")


class LoopThread:
    """An asyncio event loop running on a daemon thread until close()."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="async-client-loop", daemon=True)
        self._thread.start()

    def run(self, coroutine: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result()

    def close(self) -> None:
        self.run(self.loop.shutdown_asyncgens())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=10)
        self.loop.close()


class SyncOverAsync:
    """An AsyncSegmentClient with SegmentClient's blocking calls. `make_channel`, when given, opens the
    client's `channel=` on the client's own loop (a grpc.aio channel belongs to the loop that made it)."""

    def __init__(self, target: str, make_channel: Callable[[], grpc.aio.Channel] | None = None, **kwargs: Any) -> None:
        self._loop = LoopThread()

        async def make() -> AsyncSegmentClient:
            channel = make_channel() if make_channel is not None else None
            return AsyncSegmentClient(target, channel=channel, **kwargs)

        self.client = self._loop.run(make())

    def __getattr__(self, name: str) -> Any:
        attribute = getattr(self.client, name)
        if inspect.isasyncgenfunction(attribute):
            return lambda *args, **kwargs: self._iterate(attribute(*args, **kwargs))
        if inspect.iscoroutinefunction(attribute):
            return lambda *args, **kwargs: self._loop.run(attribute(*args, **kwargs))
        return attribute

    def _iterate(self, iterator: AsyncIterator[T]) -> Iterator[T]:
        try:
            while True:
                try:
                    item = self._loop.run(iterator.__anext__())  # type: ignore[arg-type]
                except StopAsyncIteration:
                    return
                yield item
        finally:
            self._loop.run(iterator.aclose())  # type: ignore[attr-defined]

    def close(self) -> None:
        try:
            self._loop.run(self.client.close())
        finally:
            self._loop.close()

    def __enter__(self) -> SyncOverAsync:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def connect(kind: str, target: str, *, channel_extra: list[tuple[str, object]] | None = None, **kwargs: Any) -> Any:
    """A client of `kind` ("sync" or "async") for `target`, with SegmentClient's blocking calls; `kwargs` go to
    the client as they are. `channel_extra`: the client gets a channel the caller opened (`channel=`), with
    the client's own options and these."""
    options = [*channel_options(), *(channel_extra or [])]
    if kind == "sync":
        channel = grpc.insecure_channel(target, options=options) if channel_extra is not None else None
        return SegmentClient(target, channel=channel, **kwargs)
    make_channel = (lambda: grpc.aio.insecure_channel(target, options=options)) if channel_extra is not None else None
    return SyncOverAsync(target, make_channel, **kwargs)
