"""Resuming a SegmentStream on another replica when the one serving it is lost.

gRPC retries a stream only until its first answer arrives (docs/scaling.md); after that, a replica that
dies or is cut off ends the call with UNAVAILABLE and every request it had not answered yet with it. The
client then opens a new SegmentStream, which round robin sends to another ready replica, resends those
requests in the order they were first sent, and carries on with the source. Each request is answered
once as seen by the caller: an answer that arrived is never asked again, and one lost with the
connection was never seen. Segmentation has no side effects, so asking twice costs time only.

This module is the bookkeeping (what was sent and not answered, which call is current), shared by the
sync client's segment_many and segment_video; the calls and their threads stay in client/sync.py.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from collections.abc import Callable, Iterator

import grpc

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


class ResumableRequests:
    """The requests of one logical stream over however many calls it takes.

    `attempt()` gives each new call its request iterator: first every request sent on earlier calls
    and still unanswered, then the source's next ones. Starting an attempt makes the previous one
    stale, so its iterator (still consumed by gRPC's sending thread of the dead call) stops pulling;
    pulls happen one at a time, so an item pulled by a stale iterator is recorded as unanswered and
    resent by the current one rather than lost.
    """

    def __init__(self, pull: Pull, room: Room | None = None) -> None:
        self._pull = pull
        self._room = room
        self._pull_lock = threading.Lock()  # one pull at a time, across attempts
        self._lock = threading.Lock()  # the bookkeeping below
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

    def answered(self, image_id: str) -> None:
        """An answer arrived for `image_id`: its (earliest unanswered) request is not resent."""
        with self._lock:
            sequences = self._by_id.get(image_id)
            if sequences:
                self._pending.pop(sequences.popleft(), None)
                if not sequences:
                    del self._by_id[image_id]

    def attempt(self) -> Iterator[pb.SegmentRequest]:
        """The request iterator of a new call (the first, or one resuming a lost call)."""
        with self._pull_lock, self._lock:
            self._generation += 1
            self.calls += 1
            generation = self._generation
            resend = list(self._pending.values())
        self.resent += len(resend)
        if resend:
            log.info("resuming a stream: %d unanswered request(s) sent again", len(resend))
        return self._requests(generation, resend)

    def _stale(self, generation: int) -> bool:
        return generation != self._generation

    def _requests(self, generation: int, resend: list[pb.SegmentRequest]) -> Iterator[pb.SegmentRequest]:
        for request in resend:
            if self._stale(generation):
                return
            yield request
        while True:
            if self._room is not None and not self._room(lambda: self._stale(generation)):
                return
            with self._pull_lock:
                if self._stale(generation):
                    return
                try:
                    pulled = self._pull()
                except StopIteration:
                    return
                if pulled is None:
                    continue
                request = pulled
                with self._lock:
                    self._pending[self._sequence] = request
                    self._by_id.setdefault(request.id, deque()).append(self._sequence)
                    self._sequence += 1
            yield request


def resumable(error: grpc.RpcError, resumes_in_a_row: int, limit: int) -> bool:
    """Whether a call that failed with `error` is resumed on a new one."""
    code = error.code() if isinstance(error, grpc.Call) else None
    return code in RESUMABLE_CODES and resumes_in_a_row < limit


def backoff(resumes_in_a_row: int) -> float:
    return RESUME_BACKOFF_S[min(resumes_in_a_row, len(RESUME_BACKOFF_S) - 1)]
