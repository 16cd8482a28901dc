"""The client's stream resume (client/resume.py) without a cluster: two stand-in replicas on loopback.

Each replica answers SegmentStream requests with its own name in `model`; the `lost` one ends every stream
with UNAVAILABLE after a few answers, as a stream on a lost node ends (tests/client/standins.py, which the
clients' own tests use too). These need no model and no cluster, so they run with `make test` too;
tests/cluster/test_scenarios.py has the real thing.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Iterator

import grpc
import numpy as np
import pytest

from client import SegmentClient, SegmentError
from tests.client.standins import ANSWERS_BEFORE_LOSS, StandIn, assert_each_answered_once_per_stream, start_replica


@pytest.fixture
def replicas() -> Iterator[tuple[str, StandIn, StandIn]]:
    """A target over a replica that loses every stream and one that does not; the lost one listed first."""
    lost, steady = start_replica(StandIn("lost", lose_streams=-1)), start_replica(StandIn("steady"))
    try:
        yield f"ipv4:{lost.target},{steady.target}", lost.servicer, steady.servicer
    finally:
        lost.stop()
        steady.stop()


FRAMES = [np.full((3, 4, 3), n, dtype=np.uint8) for n in range(40)]


def connect_both(client: SegmentClient) -> None:
    """Round robin alternates over the replicas it is connected to: once both are, two calls go one to each."""
    client.health()
    time.sleep(0.5)


def streams_on_both(target: str, run: object) -> list[object]:
    """Two streams at once on one client: round robin puts one on each replica."""
    outcomes: list[object] = [None, None]
    with SegmentClient(target, timeout=30, stream_resumes=3) as client:
        connect_both(client)

        def one(slot: int) -> None:
            try:
                outcomes[slot] = run(client)  # type: ignore[operator]
            except SegmentError as exc:
                outcomes[slot] = exc

        threads = [threading.Thread(target=one, args=(slot,)) for slot in range(2)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=60)
    return outcomes


def test_a_video_whose_replica_is_lost_goes_on_elsewhere_every_frame_once_and_in_order(
    replicas: tuple[str, StandIn, StandIn],
) -> None:
    target, lost, steady = replicas
    outcomes = streams_on_both(target, lambda c: [(f.index, f.result.id) for f in c.segment_frames(FRAMES, window=4)])
    expected = [(n, str(n)) for n in range(len(FRAMES))]
    assert outcomes == [expected, expected], outcomes
    assert sum(lost.answered.values()) >= ANSWERS_BEFORE_LOSS, "no stream reached the lost replica: nothing tested"
    assert_each_answered_once_per_stream(lost, steady, [str(n) for n in range(len(FRAMES))])


def test_segment_many_whose_replica_is_lost_answers_every_image_once(replicas: tuple[str, StandIn, StandIn]) -> None:
    target, lost, steady = replicas
    images = [bytes([n]) * 10 for n in range(20)]
    outcomes = streams_on_both(target, lambda c: Counter(r.id for r in c.segment_many(images)))
    assert outcomes == [Counter(str(n) for n in range(20))] * 2, outcomes
    assert sum(lost.answered.values()) >= ANSWERS_BEFORE_LOSS
    assert_each_answered_once_per_stream(lost, steady, [str(n) for n in range(20)])


def test_without_resume_the_stream_on_the_lost_replica_fails(replicas: tuple[str, StandIn, StandIn]) -> None:
    """What the resume is for: with it off, the stream that was on the lost replica ends UNAVAILABLE."""
    target, _, _ = replicas
    with SegmentClient(target, timeout=30, stream_resumes=0) as client:
        connect_both(client)
        outcomes: list[object] = []

        def one() -> None:
            try:
                outcomes.append(len(list(client.segment_frames(FRAMES, window=4))))
            except SegmentError as exc:
                outcomes.append(exc.code)

        threads = [threading.Thread(target=one) for _ in range(2)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=60)
    assert sorted(map(str, outcomes)) == sorted([str(len(FRAMES)), str(grpc.StatusCode.UNAVAILABLE)]), outcomes
