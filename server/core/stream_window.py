"""A SegmentStream's window: how many of its images the server holds at once, and how many bytes, from
the moment their request is read until their response has been sent.

A place is taken before the next request is read and given back only once its response is written,
so a caller that stops reading stops the stream's reads too, and HTTP/2 flow control pushes back on
its sends. Each place counts its request's bytes, then its response's, against the stream's byte cap
and the server's (server.core.stream_bytes). Transport-free: `serve_stream` is the one engine of every
stream call (SegmentStream answers as each image is ready, ModelStreamInfer in the order of its requests);
the door reads requests and writes responses.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import AsyncGenerator, Awaitable, Callable
from typing import Generic, TypeVar

from server.core.admission import AdmissionSlot
from server.core.buffers import StreamCounts
from server.core.stream_bytes import StreamBytes

R = TypeVar("R")
Q = TypeVar("Q")

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
        if self in window._order:  # an ordered stream's place that ends unanswered (the end of the requests)
            window._order.remove(self)
            window._flush_in_order()


class _End:
    pass


_END = _End()


class StreamWindow(Generic[R]):
    """`ordered`: responses leave in the order their requests came (ModelStreamInfer); otherwise as each is
    ready (SegmentStream), so a slow image never holds back the answers behind it."""

    def __init__(self, size: int, counts: StreamCounts, stream_bytes: StreamBytes, ordered: bool = False) -> None:
        self.size = size
        self.ordered = ordered
        self._order: deque[Place[R]] = deque()
        """Ordered streams: the places whose responses are not yet released for sending, oldest first."""
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
        if self.ordered:
            self._order.append(place)
        return place

    def deliver(self, place: Place[R], response: R, size: int) -> None:
        place.count(size)
        place.response = response
        self.counts.unsent_responses += 1
        if self.ordered:
            self._flush_in_order()
        else:
            self._ready.put_nowait(place)

    def _flush_in_order(self) -> None:
        while self._order and self._order[0].response is not None:
            self._ready.put_nowait(self._order.popleft())

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


async def serve_stream(
    window: StreamWindow[R],
    read: Callable[[], Awaitable[Q | None]],
    size_of: Callable[[Q], int],
    answer: Callable[[Place[R], Q, BaseException | None], Awaitable[R]],
    size_of_answer: Callable[[R], int],
) -> AsyncGenerator[R, None]:
    """The one stream engine. Reads requests while the window has room, answers each in a task of its own
    (`answer(place, request, refusal)`, which turns any error into an in-stream answer; `refusal`: the byte
    budget's, to be answered instead of serving the request), and yields the answers; each answer's place
    goes back once the caller's next read resumes this generator, i.e. once it has been written. Whatever
    stopped the reading, the requests already read are answered first; then the reading's own error, if
    any, is raised. The stream counts in the server's open-streams figure for as long as it runs."""
    items: set[asyncio.Task[None]] = set()

    async def one(place: Place[R], request: Q, refusal: BaseException | None) -> None:
        response = await answer(place, request, refusal)
        window.deliver(place, response, window.bytes.response_made(size_of_answer(response)))

    async def read_all() -> None:
        error: BaseException | None = None
        try:
            while True:
                place = await window.place()  # before reading: a full window leaves requests unread
                request = await read()
                if request is None:
                    place.release()
                    break
                refusal = window.bytes.refusal()
                if refusal is None:
                    place.count(window.bytes.in_progress(size_of(request)))
                item = asyncio.create_task(one(place, request, refusal))
                items.add(item)
                item.add_done_callback(items.discard)
        except Exception as exc:
            error = exc
        finally:
            if items:
                await asyncio.wait(set(items))
            window.end(error)

    window.counts.open_streams += 1
    reader = asyncio.create_task(read_all())
    try:
        while (place := await window.next_ready()) is not None:
            assert place.response is not None
            yield place.response
            place.release()  # resumed only once the write has completed
        await reader
        if window.error is not None:
            raise window.error
    finally:
        for task in (reader, *items):
            task.cancel()
        try:
            await asyncio.gather(reader, *items, return_exceptions=True)
        finally:
            # Even when this wait is cancelled too (gRPC may cancel a finished call's task again),
            # every place the stream holds goes back, or the queue would shrink for good.
            window.close()
            window.counts.open_streams -= 1
