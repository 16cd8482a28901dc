"""Resuming a SegmentStream on another replica when the one serving it is lost.

gRPC retries a stream only until its first answer arrives (docs/scaling.md); after that, a replica that
dies or is cut off ends the call with UNAVAILABLE and every request it had not answered yet with it. The
client then opens a new SegmentStream, which round robin sends to another ready replica, resends those
requests in the order they were first sent, and carries on with the source. Each request is answered
once as seen by the caller: an answer that arrived is never asked again, and one lost with the
connection was never seen. Segmentation has no side effects, so asking twice costs time only.

This module is what both clients share: the bookkeeping (`Ledger`: what was sent and not answered, which
call is current), the decision to resume (`Resumes`: which failures, how many in a row, how long to wait),
and the request iterators of each call, `ResumableRequests` for the sync client (iterated by gRPC's sending
thread) and `AsyncResumableRequests` for the asyncio one (iterated by grpc.aio's request task). The calls
themselves, and their threads or tasks, stay in client/sync.py and client/aio.py.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator

import grpc

from client.errors import SegmentError, status_code, status_lost
from protos.segserve.v1 import segserve_pb2 as pb

log = logging.getLogger(__name__)

# The codes of a lost replica or connection; the same the channel's retry policy retries.
RESUMABLE_CODES = frozenset({grpc.StatusCode.UNAVAILABLE})
# New calls in a row without an answer between them before giving up: as the retry policy's maxAttempts.
DEFAULT_RESUMES = 3
# Pause before a new call: long enough for round robin to see the lost connection, short next to a frame.
RESUME_BACKOFF_S = (0.1, 0.3, 1.0)

# Pull: the next request from the source, None for an item that needs no request (a skipped video frame),
# StopIteration at the end. Room: waits until the source may be pulled; False once `stale()` is true.
Pull = Callable[[], "pb.SegmentRequest | None"]
Room = Callable[[Callable[[], bool]], bool]
# The asyncio forms: the same, awaited; AsyncPull raises StopAsyncIteration at the end.
AsyncPull = Callable[[], Awaitable["pb.SegmentRequest | None"]]
AsyncRoom = Callable[[Callable[[], bool]], Awaitable[bool]]


class Ledger:
    """The requests of one logical stream that were sent and not answered, over however many calls it takes.

    `begin()` starts a call: it makes every earlier call stale and returns what the new one must send
    again, in the order first sent. Thread-safe (the sync client's sending and reading threads share it);
    on an event loop its lock is held for a few dict operations, never across an await.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._generation = 0
        self._sequence = 0
        self._pending: dict[int, pb.SegmentRequest] = {}  # sent, unanswered; in the order first sent
        self._by_id: dict[str, deque[int]] = {}
        self.resent = 0
        self.calls = 0

    @property
    def unanswered(self) -> int:
        with self._lock:
            return len(self._pending)

    def begin(self) -> tuple[int, list[pb.SegmentRequest]]:
        """A new call: its generation, and the requests it sends before any new one."""
        with self._lock:
            self._generation += 1
            self.calls += 1
            generation = self._generation
            resend = list(self._pending.values())
        self.resent += len(resend)
        if resend:
            log.info("resuming a stream: %d unanswered request(s) sent again", len(resend))
        return generation, resend

    def stale(self, generation: int) -> bool:
        return generation != self._generation

    def sent(self, request: pb.SegmentRequest) -> None:
        """`request` was taken from the source for a call: unanswered until `answered(request.id)`."""
        with self._lock:
            self._pending[self._sequence] = request
            self._by_id.setdefault(request.id, deque()).append(self._sequence)
            self._sequence += 1

    def answered(self, image_id: str) -> None:
        """An answer arrived for `image_id`: its (earliest unanswered) request is not resent."""
        with self._lock:
            sequences = self._by_id.get(image_id)
            if sequences:
                self._pending.pop(sequences.popleft(), None)
                if not sequences:
                    del self._by_id[image_id]


class ResumableRequests(Ledger):
    """The sync client's requests of one logical stream over however many calls it takes.

    `attempt()` gives each new call its request iterator: first every request sent on earlier calls
    and still unanswered, then the source's next ones. Starting an attempt makes the previous one
    stale, so its iterator (still consumed by gRPC's sending thread of the dead call) stops pulling;
    pulls happen one at a time, so an item pulled by a stale iterator is recorded as unanswered and
    resent by the current one rather than lost.
    """

    def __init__(self, pull: Pull, room: Room | None = None) -> None:
        super().__init__()
        self._pull = pull
        self._room = room
        self._pull_lock = threading.Lock()  # one pull at a time, across attempts

    def attempt(self) -> Iterator[pb.SegmentRequest]:
        """The request iterator of a new call (the first, or one resuming a lost call)."""
        with self._pull_lock:
            generation, resend = self.begin()
        return self._requests(generation, resend)

    def _requests(self, generation: int, resend: list[pb.SegmentRequest]) -> Iterator[pb.SegmentRequest]:
        for request in resend:
            if self.stale(generation):
                return
            yield request
        while True:
            if self._room is not None and not self._room(lambda: self.stale(generation)):
                return
            with self._pull_lock:
                if self.stale(generation):
                    return
                try:
                    pulled = self._pull()
                except StopIteration:
                    return
                if pulled is None:
                    continue
                request = pulled
                self.sent(request)
            yield request


class AsyncResumableRequests(Ledger):
    """The asyncio client's requests of one logical stream over however many calls it takes.

    As ResumableRequests: each call's `attempt()` sends the unanswered requests again, then the source's
    next ones. A pull runs as a task of its own, shielded from the iterator awaiting it: when a lost call
    is cancelled (and grpc.aio cancels its request task with it) in the middle of a pull, the pull goes on
    and the next call's iterator takes its request, so nothing pulled from the source is lost or pulled
    twice. Only the current call's iterator takes a pulled request; a stale one stops without it.
    """

    def __init__(self, pull: AsyncPull, room: AsyncRoom | None = None) -> None:
        super().__init__()
        self._pull = pull
        self._room = room
        self._pulling: asyncio.Future[pb.SegmentRequest | None] | None = None

    def attempt(self) -> AsyncIterator[pb.SegmentRequest]:
        """The request iterator of a new call (the first, or one resuming a lost call)."""
        generation, resend = self.begin()
        return self._requests(generation, resend)

    def close(self) -> None:
        """The stream is over: a pull still running is cancelled (a worker thread inside it runs to its end)."""
        if self._pulling is not None:
            self._pulling.cancel()
            self._pulling = None

    async def _requests(self, generation: int, resend: list[pb.SegmentRequest]) -> AsyncIterator[pb.SegmentRequest]:
        for request in resend:
            if self.stale(generation):
                return
            yield request
        while True:
            if self._room is not None and not await self._room(lambda: self.stale(generation)):
                return
            if self._pulling is None:
                self._pulling = asyncio.ensure_future(self._pull())
            pulling = self._pulling
            try:
                pulled = await asyncio.shield(pulling)
            except StopAsyncIteration:
                return  # left in place: every later pull ends the same way
            if self.stale(generation):
                return  # the current call's iterator takes it
            self._pulling = None
            if pulled is None:
                continue
            self.sent(pulled)
            yield pulled


class Resumes:
    """When a stream that failed is resumed: only on a lost replica (RESUMABLE_CODES), at most `limit` new
    calls in a row without an answer between them (0: never), after a pause that grows with each."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.in_a_row = 0

    def answer(self) -> None:
        """An answer arrived: the count of resumes in a row starts again."""
        self.in_a_row = 0

    def after(self, error: grpc.RpcError) -> float:
        """The pause before the call that resumes the stream `error` ended; raises SegmentError when it
        is not resumed."""
        if not resumable(error, self.in_a_row, self.limit):
            raise SegmentError.from_rpc_error(error) from None
        pause = backoff(self.in_a_row)
        self.in_a_row += 1
        return pause


def resumable(error: grpc.RpcError, resumes_in_a_row: int, limit: int) -> bool:
    """Whether a call that failed with `error` is resumed on a new one: a lost replica or connection
    (RESUMABLE_CODES), or a status grpc.aio lost to a request written as the call ended (errors.status_lost):
    the stream ended and why is unknown, but never by its caller's own cancel, so asking again costs time
    only. The sync client never sees the second."""
    return (status_code(error) in RESUMABLE_CODES or status_lost(error)) and resumes_in_a_row < limit


def backoff(resumes_in_a_row: int) -> float:
    return RESUME_BACKOFF_S[min(resumes_in_a_row, len(RESUME_BACKOFF_S) - 1)]


def time_left(deadline: float | None) -> float | None:
    """The time left until `deadline` (monotonic) for the next call of a stream: a resumed stream's calls
    share the one timeout the caller gave for the whole stream. None: no limit."""
    return None if deadline is None else max(0.001, deadline - time.monotonic())
