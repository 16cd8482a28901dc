"""Bytes that streams make the server hold: requests read and not yet answered, responses made and not
yet sent. Counted per stream against SEGSERVE_STREAM_MAX_BYTES and across all streams (SegmentStream,
ModelStreamInfer, and HTTP responses being sent) against SEGSERVE_STREAM_BUDGET_BYTES.

A stream's window bounds its images by count; these bound them by size, since one overlay response of a
large photo weighs as much as a hundred masks. An image in progress counts as much as the largest response
its stream has made so far (a quarter of the stream's cap before the first; its request, if larger), then
its response's size once made. So the cap can be passed only by the responses of images already in
progress when it was reached, and the window (16 images) bounds those. Past
either cap a stream stops reading requests until what
it holds is sent, so its caller resumes it by reading; a stream that holds nothing is never made to wait
(it could not free anything by reading), and when the server-wide cap is full its next request is
answered RESOURCE_EXHAUSTED instead. Single event loop: no locking needed.
"""

from __future__ import annotations

import asyncio

from server.errors import Overloaded

# Until a stream has made its first response, an image in progress counts this share of the stream's cap:
# with requests counted at their own size, a stalled stream of small photos read its whole window before
# the first (much larger) overlay existed, and held well over its cap (docs/operations.md, 'Where a
# stalled stream's memory went').
FIRST_GUESS_SHARE = 4


class StreamBudget:
    """The server-wide count, and the streams waiting for room in it."""

    def __init__(self, limit: int, per_stream: int) -> None:
        self.limit = limit
        self.per_stream = per_stream
        self.held = 0
        self._waiting: set[StreamBytes] = set()

    @property
    def paused(self) -> int:
        """Streams not reading their next request until they or others have sent what they hold."""
        return len(self._waiting)

    def stream(self) -> StreamBytes:
        return StreamBytes(self)

    def full(self) -> bool:
        return self.held >= self.limit

    def refusal(self, what: str) -> Overloaded:
        return Overloaded(
            f"server busy: streams hold {self.held} bytes of requests not yet answered and responses not yet "
            f"read by their callers, at SEGSERVE_STREAM_BUDGET_BYTES={self.limit}; {what} was refused, retry "
            "later or on another replica"
        )

    def _changed(self) -> None:
        for stream in self._waiting:
            stream._room.set()


class StreamBytes:
    """One stream's share of the budget."""

    def __init__(self, budget: StreamBudget) -> None:
        self.budget = budget
        self.held = 0
        self.largest_response = 0
        self._room = asyncio.Event()

    def in_progress(self, request_size: int) -> int:
        """What an image just read counts until its response is made."""
        guess = self.largest_response or self.budget.per_stream // FIRST_GUESS_SHARE
        return max(request_size, guess)

    def response_made(self, size: int) -> int:
        self.largest_response = max(self.largest_response, size)
        return size

    def _must_wait(self) -> bool:
        budget = self.budget
        return self.held > 0 and (self.held >= budget.per_stream or budget.full())

    async def wait_for_room(self) -> None:
        """Before reading the next request: waits while this stream holds its cap, or holds anything while
        the server-wide budget is full. Only sends (this caller's reads, or other streams') end the wait."""
        budget = self.budget
        while self._must_wait():
            self._room.clear()
            budget._waiting.add(self)
            try:
                await self._room.wait()
            finally:
                budget._waiting.discard(self)

    def refusal(self) -> Overloaded | None:
        """For a request just read by a stream that holds nothing: the error to answer it with when the
        server-wide budget is full (it is not counted, and its bytes go at once)."""
        if self.held == 0 and self.budget.full():
            return self.budget.refusal("this stream request")
        return None

    def add(self, size: int) -> None:
        self.held += size
        self.budget.held += size

    def remove(self, size: int) -> None:
        if size <= 0:
            return
        self.held -= size
        self.budget.held -= size
        self._room.set()
        self.budget._changed()

    def release(self) -> None:
        """The stream is over: whatever it still counts goes back."""
        self.remove(self.held)
