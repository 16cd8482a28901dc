"""Stand-in replicas on loopback for the clients' tests: a Segmenter whose streams can be cut, and a health
service the test sets. They need no model, so a lost replica or a server that is slow to serve takes
milliseconds to stage. tests/cluster/test_stream_resume.py uses them too.
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Iterator
from concurrent import futures
from dataclasses import dataclass

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from client.channel import HEALTH_SERVICE
from protos.segserve.v1 import segserve_pb2 as pb
from protos.segserve.v1 import segserve_pb2_grpc as pb_grpc

ANSWERS_BEFORE_LOSS = 3


class StandIn(pb_grpc.SegmenterServicer):
    """Answers each SegmentStream request with its own name in `model`. `lose_streams` of its streams (-1:
    every one) end with UNAVAILABLE after ANSWERS_BEFORE_LOSS answers, as a stream on a lost node ends."""

    def __init__(self, name: str, lose_streams: int = 0) -> None:
        self.name = name
        self.lose_streams = lose_streams
        self.answered: Counter[str] = Counter()
        self.streams = 0
        self.user_agents: list[str] = []
        self.lock = threading.Lock()

    def SegmentStream(
        self, request_iterator: Iterator[pb.SegmentRequest], context: grpc.ServicerContext
    ) -> Iterator[pb.SegmentResponse]:
        with self.lock:
            self.streams += 1
            lost = self.lose_streams != 0
            if self.lose_streams > 0:
                self.lose_streams -= 1
            self.user_agents += [value for key, value in context.invocation_metadata() if key == "user-agent"]
        for n, request in enumerate(request_iterator):
            if lost and n == ANSWERS_BEFORE_LOSS:
                context.abort(grpc.StatusCode.UNAVAILABLE, "Stream removed (the stand-in's node is lost)")
            with self.lock:
                self.answered[request.id] += 1
            yield pb.SegmentResponse(id=request.id, width=4, height=3, model=self.name)


@dataclass
class Replica:
    servicer: StandIn
    checks: health.HealthServicer
    server: grpc.Server
    port: int

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def serving(self, yes: bool) -> None:
        """What its health service says, overall and for the Segmenter (the channel's health check)."""
        status = health_pb2.HealthCheckResponse.SERVING if yes else health_pb2.HealthCheckResponse.NOT_SERVING
        for service in ("", HEALTH_SERVICE):
            self.checks.set(service, status)

    def stop(self) -> None:
        self.server.stop(0)


def start_replica(servicer: StandIn, serving: bool = True) -> Replica:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
    pb_grpc.add_SegmenterServicer_to_server(servicer, server)
    checks = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(checks, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    replica = Replica(servicer, checks, server, port)
    replica.serving(serving)
    return replica


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
