"""A SegmentStream's window: how many of its images the server holds at once, and how many bytes, from
the moment their request is read until their response has been sent.

A place is taken before the next request is read and given back only once its response is written,
so a caller that stops reading stops the stream's reads too, and HTTP/2 flow control pushes back on
its sends. Each place counts its request's bytes, then its response's, against the stream's byte cap
and the server's (server.core.stream_bytes). Transport-free: the servicer reads requests and writes responses.
"""

from __future__ import annotations

import asyncio
from typing import Generic, TypeVar

from server.core.admission import AdmissionSlot
from server.core.buffers import StreamCounts
from server.core.stream_bytes import StreamBytes

R = TypeVar("R")

STREAM_WINDOW = 16
"""Images a stream call (SegmentStream, ModelStreamInfer) holds at once, from reading the request until its
response is sent; beyond this the stream stops reading until a response has been written."""


class Place(Generic[R]):
    """One image of the stream: its window place, its queue place once admitted, then its response."""

    def __init__(self, window: StreamWindow[R]) -> None:
        self._window: StreamWindow[R] | None = window
        self.admission: AdmissionSlot | None = None
        self.response: R | None = None
        self.size = 0
        """Bytes this image counts now: its request's until the response is made, then the response's."""

    def count(self, size: int) -> None:
        window = self._window
        if window is None:
            return
        window.bytes.add(size)
        window.bytes.remove(self.size)
        self.size = size

    def release(self) -> None:
        """Its response was sent, or the stream ended: give back both places. Safe to call twice."""
        window = self._window
        if window is None:
            return
        self._window = None
        if self.admission is not None:
            self.admission.release()
        if self.response is not None:
            window.counts.unsent_responses -= 1
        window.bytes.remove(self.size)
        self.size = 0
        window._places.discard(self)
        window._permits.release()


class _End:
    pass


_END = _End()


class StreamWindow(Generic[R]):
    def __init__(self, size: int, counts: StreamCounts, stream_bytes: StreamBytes) -> None:
        self.size = size
        self.counts = counts
        self.bytes = stream_bytes
        self._permits = asyncio.Semaphore(size)
        # One entry per place at most, plus the end marker: a put never waits.
        self._ready: asyncio.Queue[Place[R] | _End] = asyncio.Queue(maxsize=size + 1)
        self._places: set[Place[R]] = set()
        self._ended = False
        self.error: BaseException | None = None
        """Why the request side stopped, when it failed rather than ended."""

    @property
    def held(self) -> int:
        return len(self._places)

    async def place(self) -> Place[R]:
        """Waits while the window is full of images in progress or responses not yet sent, by count or by
        bytes (server.core.stream_bytes)."""
        await self._permits.acquire()
        try:
            await self.bytes.wait_for_room()
        except BaseException:
            self._permits.release()
            raise
        place = Place(self)
        self._places.add(place)
        return place

    def deliver(self, place: Place[R], response: R, size: int) -> None:
        place.count(size)
        place.response = response
        self.counts.unsent_responses += 1
        self._ready.put_nowait(place)

    def end(self, error: BaseException | None = None) -> None:
        """No more responses will come (after the ones delivered); called once, however the reading stopped."""
        if not self._ended:
            self._ended = True
            self.error = error
            self._ready.put_nowait(_END)

    async def next_ready(self) -> Place[R] | None:
        """The next response to send (release its place once sent), or None at the end."""
        entry = await self._ready.get()
        return None if isinstance(entry, _End) else entry

    def close(self) -> None:
        """The stream is over: places still held (cancelled work, responses never sent) are given back."""
        for place in list(self._places):
            place.release()
        self.bytes.release()
        # The error's traceback holds the reading task's frame, which holds this window: let the cycle go now.
        self.error = None
