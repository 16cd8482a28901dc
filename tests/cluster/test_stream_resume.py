"""The client's stream resume (client/resume.py) without a cluster: two stand-in replicas on loopback.

Each replica answers SegmentStream requests with its own name in `model`; the `lost` one ends every stream
with UNAVAILABLE after a few answers, as a stream on a lost node ends. These need no model and no cluster,
so they run with `make test` too; tests/cluster/test_scenarios.py has the real thing.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Iterator
from concurrent import futures

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from client import SegmentClient, SegmentError
from protos.segserve.v1 import segserve_pb2 as pb
from protos.segserve.v1 import segserve_pb2_grpc as pb_grpc

ANSWERS_BEFORE_LOSS = 3


class StandIn(pb_grpc.SegmenterServicer):
    def __init__(self, name: str, lost: bool) -> None:
        self.name = name
        self.lost = lost
        self.answered: Counter[str] = Counter()
        self.lock = threading.Lock()

    def SegmentStream(
        self, request_iterator: Iterator[pb.SegmentRequest], context: grpc.ServicerContext
    ) -> Iterator[pb.SegmentResponse]:
        for n, request in enumerate(request_iterator):
            if self.lost and n == ANSWERS_BEFORE_LOSS:
                context.abort(grpc.StatusCode.UNAVAILABLE, "Stream removed (the stand-in's node is lost)")
            with self.lock:
                self.answered[request.id] += 1
            yield pb.SegmentResponse(id=request.id, width=4, height=3, model=self.name)


def serve(servicer: StandIn) -> tuple[grpc.Server, int]:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
    pb_grpc.add_SegmenterServicer_to_server(servicer, server)
    checks = health.HealthServicer()
    checks.set("", health_pb2.HealthCheckResponse.SERVING)
    checks.set("segserve.v1.Segmenter", health_pb2.HealthCheckResponse.SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(checks, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    return server, port


@pytest.fixture
def replicas() -> Iterator[tuple[str, StandIn, StandIn]]:
    """A target over a replica that loses every stream and one that does not; the lost one listed first."""
    lost, steady = StandIn("lost", lost=True), StandIn("steady", lost=False)
    servers = [serve(lost), serve(steady)]
    try:
        yield f"ipv4:127.0.0.1:{servers[0][1]},127.0.0.1:{servers[1][1]}", lost, steady
    finally:
        for server, _ in servers:
            server.stop(0)


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


def assert_each_answered_once_per_stream(lost: StandIn, steady: StandIn, ids: list[str]) -> None:
    """What the replicas answered, counted where they answer: each id once per stream (two streams here).

    A resume may send again what the lost replica took and did not answer. What it did answer reached the
    client before the stream's status (the stand-in ends a stream after its answers; an answer dying with
    a real connection is not staged here), so asking it again is a bug the client's own checks would not
    see if it kept one of the two answers.
    """
    answered = lost.answered + steady.answered
    wrong = {image_id: n for image_id, n in answered.items() if n != 2}
    assert answered == Counter({image_id: 2 for image_id in ids}), f"answered other than once per stream: {wrong}"


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
