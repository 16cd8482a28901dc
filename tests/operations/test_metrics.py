"""The Prometheus endpoint moves with traffic; one structured log line per call carries the caller's request id."""

from __future__ import annotations

import json
import logging
import urllib.request

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from client import AsyncSegmentClient, SegmentClient
from protos.segserve.v1 import segserve_pb2 as pb
from protos.segserve.v1 import segserve_pb2_grpc as pb_grpc
from server.operations.metrics import Metrics
from tests.helpers.images import encode, photo_like
from tests.helpers.servers import ServerThread


def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample on /metrics, keyed by (name, sorted labels)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(samples: dict, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def test_counters_histograms_and_gauges_move_under_load(server: ServerThread, jpeg_bytes: bytes) -> None:
    assert server.app.metrics_port
    before = scrape(server.app.metrics_port)
    with SegmentClient(server.target) as client:
        for _ in range(3):
            client.segment(jpeg_bytes)
        with pytest.raises(Exception, match="INVALID_ARGUMENT"):
            client.segment(b"not an image")
        results = list(client.segment_many([jpeg_bytes, b"junk"]))
    assert sorted(r.ok for r in results) == [False, True]
    after = scrape(server.app.metrics_port)

    def moved(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    assert moved("segserve_requests_total", method="Segment", code="OK") == 3
    assert moved("segserve_requests_total", method="Segment", code="INVALID_ARGUMENT") == 1
    assert moved("segserve_requests_total", method="SegmentStream", code="OK") == 1
    assert moved("segserve_request_seconds_count", method="Segment") == 4
    assert moved("segserve_images_total", code="OK") == 4
    assert moved("segserve_images_total", code="INVALID_ARGUMENT") == 2
    assert moved("segserve_stage_seconds_count", stage="inference") == 4
    assert moved("segserve_batch_size_count") >= 2  # batches, at most one per image
    assert value(after, "segserve_requests_in_progress", method="Segment") == 0
    assert value(after, "segserve_queue_depth") == 0
    assert value(after, "segserve_queue_limit") == server.settings.max_queue
    info = [key for key in after if key[0] == "segserve_model_info"]
    assert len(info) == 1 and dict(info[0][1])["model"] == "deeplabv3_mobilenet_v3_large"
    assert after[info[0]] == 1
    assert value(after, "process_resident_memory_bytes") > 50 * 2**20


def test_one_log_line_per_call_with_the_callers_request_id(
    server: ServerThread, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="segserve.access")
    with SegmentClient(server.target) as client:
        client.segment(encode(photo_like(90, 30)), image_id="wide", request_id="trace-42")
        with pytest.raises(Exception, match="INVALID_ARGUMENT"):
            client.segment(b"", request_id="trace-43")
        client.health()  # health checks are counted, not logged
    lines = [json.loads(r.getMessage()) for r in caplog.records if r.name == "segserve.access"]
    by_id = {line["request_id"]: line for line in lines}
    assert len(lines) == 2 and set(by_id) == {"trace-42", "trace-43"}
    ok = by_id["trace-42"]
    assert ok["method"] == "Segment" and ok["status"] == "OK" and ok["image_id"] == "wide"
    assert (ok["width"], ok["height"]) == (90, 30) and ok["batch_size"] >= 1 and ok["ms"] > 0
    assert by_id["trace-43"]["status"] == "INVALID_ARGUMENT"


def test_request_id_comes_back_and_is_made_up_when_absent(server: ServerThread, jpeg_bytes: bytes) -> None:
    with grpc.insecure_channel(server.target) as channel:
        stub = pb_grpc.SegmenterStub(channel)
        _, call = stub.Segment.with_call(pb.SegmentRequest(image=jpeg_bytes), metadata=(("x-request-id", "mine"),))
        assert ("x-request-id", "mine") in tuple(call.trailing_metadata() or ())
        _, call = stub.Segment.with_call(pb.SegmentRequest(image=jpeg_bytes))
        made_up = dict(call.trailing_metadata() or ())["x-request-id"]
        assert len(made_up) == 32
        with pytest.raises(grpc.RpcError) as info:
            stub.Segment(pb.SegmentRequest(image=b""), metadata=(("x-request-id", "bad-one"),))
        assert ("x-request-id", "bad-one") in tuple(info.value.trailing_metadata() or ())


def test_each_app_has_its_own_registry() -> None:
    first, second = Metrics(), Metrics()
    first.requests.labels("Segment", "OK").inc()
    assert first.registry.get_sample_value("segserve_requests_total", {"method": "Segment", "code": "OK"}) == 1
    assert second.registry.get_sample_value("segserve_requests_total", {"method": "Segment", "code": "OK"}) is None
    assert first.serve("127.0.0.1", -1) is None  # -1 turns the endpoint off


async def test_async_client_sends_its_request_id(
    server: ServerThread, jpeg_bytes: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="segserve.access")
    async with AsyncSegmentClient(server.target) as client:
        await client.segment(jpeg_bytes, request_id="async-7")
        results = [r async for r in client.segment_many([jpeg_bytes, jpeg_bytes], request_id="async-8")]
    assert all(r.ok for r in results)
    lines = {
        json.loads(r.getMessage())["request_id"]: json.loads(r.getMessage())
        for r in caplog.records
        if r.name == "segserve.access"
    }
    assert lines["async-7"]["method"] == "Segment" and lines["async-7"]["status"] == "OK"
    assert lines["async-8"]["method"] == "SegmentStream" and lines["async-8"]["images"] == 2


def test_a_taken_metrics_port_is_logged_and_the_server_goes_on(caplog: pytest.LogCaptureFixture) -> None:
    first = Metrics()
    port = first.serve("127.0.0.1", 0)
    assert port is not None
    try:
        assert Metrics().serve("127.0.0.1", port) is None
    finally:
        first.close()
    assert any("metrics endpoint not started" in r.getMessage() and r.levelname == "ERROR" for r in caplog.records)
