"""Both clients resume a SegmentStream whose replica is lost (client/resume.py), against stand-in replicas.

Each test runs once with SegmentClient and once with AsyncSegmentClient (`connect_client`). A stream cut
with UNAVAILABLE after some answers goes on over a new call: the unanswered requests are sent again, in
the order first sent, and every image is answered once as the caller sees it.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

import grpc
import numpy as np
import pytest

from client import SegmentError
from client.errors import LOST_STATUS_MESSAGE
from tests.client.standins import (
    ANSWERS_BEFORE_LOSS,
    Replica,
    StandIn,
    assert_each_answered_once_per_stream,
    start_replica,
)

FRAMES = [np.full((3, 4, 3), n, dtype=np.uint8) for n in range(40)]
IMAGES = [bytes([n]) * 10 for n in range(20)]


@pytest.fixture
def lost_once() -> Iterator[Replica]:
    """One replica whose first stream is cut after a few answers; the next ones it serves to the end."""
    replica = start_replica(StandIn("flaky", lose_streams=1))
    yield replica
    replica.stop()


@pytest.fixture
def replicas() -> Iterator[tuple[str, StandIn, StandIn]]:
    """A target over a replica that loses every stream and one that does not; the lost one listed first."""
    lost, steady = start_replica(StandIn("lost", lose_streams=-1)), start_replica(StandIn("steady"))
    try:
        yield f"ipv4:{lost.target},{steady.target}", lost.servicer, steady.servicer
    finally:
        lost.stop()
        steady.stop()


def streams_on_both(connect_client: Callable[..., Any], target: str, run: Callable[[Any], object]) -> list[object]:
    """Two streams at once on one client: round robin puts one on each replica."""
    outcomes: list[object] = [None, None]
    with connect_client(target, timeout=30, stream_resumes=3) as client:
        client.health()  # connects to both: round robin then alternates, two calls one to each
        time.sleep(0.5)

        def one(slot: int) -> None:
            try:
                outcomes[slot] = run(client)
            except SegmentError as exc:
                outcomes[slot] = exc

        threads = [threading.Thread(target=one, args=(slot,)) for slot in range(2)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=60)
    return outcomes


def test_segment_many_cut_after_some_answers_goes_on_and_answers_every_image_once(
    connect_client: Callable[..., Any], lost_once: Replica
) -> None:
    with connect_client(lost_once.target, timeout=30) as client:
        ids = [result.id for result in client.segment_many(IMAGES)]
    assert Counter(ids) == Counter(str(n) for n in range(len(IMAGES))), ids
    assert lost_once.servicer.streams == 2  # the cut one and the one that resumed it
    # What the first stream answered is not asked again: the first answers were given once.
    assert all(lost_once.servicer.answered[str(n)] == 1 for n in range(ANSWERS_BEFORE_LOSS))


def test_video_cut_after_some_answers_goes_on_every_frame_once_and_in_order(
    connect_client: Callable[..., Any], lost_once: Replica
) -> None:
    with connect_client(lost_once.target, timeout=30) as client:
        results = [(f.index, f.result.id) for f in client.segment_frames(FRAMES, window=4)]
    assert results == [(n, str(n)) for n in range(len(FRAMES))]
    assert lost_once.servicer.streams == 2
    assert all(lost_once.servicer.answered[str(n)] == 1 for n in range(ANSWERS_BEFORE_LOSS))


def test_a_video_whose_replica_is_lost_goes_on_elsewhere_every_frame_once_and_in_order(
    connect_client: Callable[..., Any], replicas: tuple[str, StandIn, StandIn]
) -> None:
    target, lost, steady = replicas
    outcomes = streams_on_both(
        connect_client, target, lambda c: [(f.index, f.result.id) for f in c.segment_frames(FRAMES, window=4)]
    )
    expected = [(n, str(n)) for n in range(len(FRAMES))]
    assert outcomes == [expected, expected], outcomes
    assert sum(lost.answered.values()) >= ANSWERS_BEFORE_LOSS, "no stream reached the lost replica: nothing tested"
    assert_each_answered_once_per_stream(lost, steady, [str(n) for n in range(len(FRAMES))])


def test_segment_many_whose_replica_is_lost_answers_every_image_once(
    connect_client: Callable[..., Any], replicas: tuple[str, StandIn, StandIn]
) -> None:
    target, lost, steady = replicas
    outcomes = streams_on_both(connect_client, target, lambda c: Counter(r.id for r in c.segment_many(IMAGES)))
    assert outcomes == [Counter(str(n) for n in range(len(IMAGES)))] * 2, outcomes
    assert sum(lost.answered.values()) >= ANSWERS_BEFORE_LOSS
    assert_each_answered_once_per_stream(lost, steady, [str(n) for n in range(len(IMAGES))])


@pytest.mark.parametrize("call", ["segment_many", "segment_frames"])
def test_without_resume_the_stream_on_the_lost_replica_fails(
    connect_client: Callable[..., Any], client_kind: str, lost_once: Replica, call: str
) -> None:
    """What the resume is for: with it off (stream_resumes=0), a cut stream ends UNAVAILABLE."""
    with connect_client(lost_once.target, timeout=30, stream_resumes=0) as client:
        items = IMAGES if call == "segment_many" else FRAMES
        with pytest.raises(SegmentError) as failed:
            list(getattr(client, call)(items))
    error = failed.value
    if client_kind == "async" and error.code == grpc.StatusCode.INTERNAL:
        # grpc.aio lost the status to a request written as the stream ended (client/errors.py, status_lost).
        assert LOST_STATUS_MESSAGE in error.message, error
    else:
        assert error.code == grpc.StatusCode.UNAVAILABLE and "node is lost" in error.message, error
    assert lost_once.servicer.streams == 1
