"""Streams, overload, deadlines and cancellation, with the model held shut by a gate so that what is
stuck where is known exactly (no timing assumptions): refusals must come while the model is blocked."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import grpc
import pytest

from protos.segserve.v1 import segserve_pb2 as pb
from protos.segserve.v1 import segserve_pb2_grpc as pb_grpc
from tests.helpers.gate import Gate, sample, wait_until
from tests.helpers.images import encode, photo_like
from tests.helpers.servers import ServerThread, make_settings

MAX_QUEUE = 4
MAX_IMAGE_BYTES = 1024 * 1024
IMAGE = encode(photo_like(64, 48), "JPEG")


@pytest.fixture(scope="module")
def gated() -> Iterator[tuple[ServerThread, Gate]]:
    gate = Gate()
    server = ServerThread(
        make_settings(max_queue=MAX_QUEUE, max_batch_size=2, max_image_bytes=MAX_IMAGE_BYTES, warmup=False),
        runtime_factory=gate.gated_runtime,
    )
    yield server, gate
    gate.open.set()
    server.stop()


@pytest.fixture
def stub(gated: tuple[ServerThread, Gate]) -> Iterator[pb_grpc.SegmenterStub]:
    with grpc.insecure_channel(gated[0].target) as channel:
        yield pb_grpc.SegmenterStub(channel)


def test_a_flood_beyond_the_queue_is_refused_at_once_and_admitted_requests_complete(
    gated: tuple[ServerThread, Gate], stub: pb_grpc.SegmenterStub
) -> None:
    server, gate = gated
    refused_before = sample(server, "segserve_requests_total", method="Segment", code="RESOURCE_EXHAUSTED")
    gate.open.clear()
    try:
        admitted = [
            stub.Segment.future(pb.SegmentRequest(id=str(i), image=IMAGE), timeout=60) for i in range(MAX_QUEUE)
        ]
        wait_until(lambda: server.app.pipeline.in_flight == MAX_QUEUE, "the queue is full")
        flood = [stub.Segment.future(pb.SegmentRequest(image=IMAGE), timeout=60) for _ in range(24)]
        # Every refusal arrives while the model is still blocked: nobody waited for a slot.
        for future in flood:
            error = future.exception(timeout=30)
            assert isinstance(error, grpc.RpcError) and error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "SEGSERVE_MAX_QUEUE=4" in (error.details() or "")
        assert not any(future.done() for future in admitted)
        assert gate.batches == []
    finally:
        gate.open.set()
    assert sorted(future.result(timeout=60).id for future in admitted) == ["0", "1", "2", "3"]
    assert sample(server, "segserve_requests_total", method="Segment", code="RESOURCE_EXHAUSTED") - refused_before == 24
    wait_until(lambda: server.app.pipeline.in_flight == 0, "the queue is empty")


def test_a_request_past_its_deadline_frees_its_slot_and_never_reaches_the_model(
    gated: tuple[ServerThread, Gate], stub: pb_grpc.SegmenterStub
) -> None:
    server, gate = gated
    gate.batches.clear()
    gate.open.clear()
    try:
        blocking = stub.Segment.future(pb.SegmentRequest(id="first", image=IMAGE), timeout=60)
        wait_until(lambda: server.app.pipeline.in_flight == 1, "the first request is in the model")
        wait_until(lambda: sample(server, "segserve_queue_depth") == 1, "the first request is in the model")
        late = stub.Segment.future(pb.SegmentRequest(id="late", image=encode(photo_like(48, 64))), timeout=1.0)
        error = late.exception(timeout=30)
        assert isinstance(error, grpc.RpcError) and error.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        # Its slot comes back while the model is still blocked.
        wait_until(lambda: server.app.pipeline.in_flight == 1, "the late request's slot is freed")
    finally:
        gate.open.set()
    assert blocking.result(timeout=60).id == "first"
    assert gate.batches == [1], "the expired request reached the model"
    wait_until(
        lambda: sample(server, "segserve_requests_total", method="Segment", code="DEADLINE_EXCEEDED") >= 1,
        "the deadline is counted",
    )


def test_a_caller_cancelling_mid_upload_frees_its_work(
    gated: tuple[ServerThread, Gate], stub: pb_grpc.SegmenterStub
) -> None:
    server, _ = gated
    cancelled_before = sample(server, "segserve_requests_total", method="SegmentUpload", code="CANCELLED")
    release = threading.Event()

    def chunks() -> Iterator[pb.ImageChunk]:
        yield pb.ImageChunk(id="half", data=IMAGE[:500])
        release.wait(30)  # the rest never comes

    call = stub.SegmentUpload.future(chunks(), timeout=60)
    try:
        wait_until(
            lambda: sample(server, "segserve_requests_in_progress", method="SegmentUpload") == 1, "the upload starts"
        )
        call.cancel()
        wait_until(
            lambda: (
                sample(server, "segserve_requests_total", method="SegmentUpload", code="CANCELLED")
                == cancelled_before + 1
            ),
            "the server sees the cancellation",
        )
    finally:
        release.set()
    assert sample(server, "segserve_requests_in_progress", method="SegmentUpload") == 0
    assert server.app.pipeline.in_flight == 0
    assert stub.Segment(pb.SegmentRequest(image=IMAGE), timeout=60).width == 64


def test_an_upload_over_the_byte_limit_is_refused_as_soon_as_it_passes(
    gated: tuple[ServerThread, Gate], stub: pb_grpc.SegmenterStub
) -> None:
    sent = 0
    chunk = b"\0" * (256 * 1024)

    def endless() -> Iterator[pb.ImageChunk]:
        nonlocal sent
        yield pb.ImageChunk(id="huge", data=chunk)
        for _ in range(399):  # 100 MiB if nobody stops it
            sent += 1
            yield pb.ImageChunk(data=chunk)

    with pytest.raises(grpc.RpcError) as info:
        stub.SegmentUpload(endless(), timeout=60)
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert f"upload passed {MAX_IMAGE_BYTES} bytes" in (info.value.details() or "")
    # The limit is 4 chunks; flow control lets the client run a few MiB ahead, never the whole 100 MiB.
    print(f"client sent {sent + 1} chunks of 256 KiB before the refusal")
    assert sent < 60, f"client sent {sent} chunks before the refusal"


def test_upload_with_no_chunks_and_options_on_a_later_chunk(stub: pb_grpc.SegmenterStub) -> None:
    with pytest.raises(grpc.RpcError) as info:
        stub.SegmentUpload(iter([]), timeout=30)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "no chunks" in (info.value.details() or "")
    late_options = [pb.ImageChunk(id="x", data=IMAGE[:100]), pb.ImageChunk(options=pb.SegmentOptions(), data=IMAGE)]
    with pytest.raises(grpc.RpcError) as info:
        stub.SegmentUpload(iter(late_options), timeout=30)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "first chunk" in (info.value.details() or "")


def test_a_stream_with_one_bad_image_among_good_ones(stub: pb_grpc.SegmenterStub) -> None:
    requests = [pb.SegmentRequest(id=f"good-{i}", image=encode(photo_like(40 + i, 30, seed=i))) for i in range(6)]
    requests.insert(3, pb.SegmentRequest(id="bad", image=IMAGE[: len(IMAGE) // 3]))
    responses = {r.id: r for r in stub.SegmentStream(iter(requests), timeout=60)}
    assert set(responses) == {r.id for r in requests}
    bad = responses.pop("bad")
    assert bad.error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0] and "truncated" in bad.error.message.lower()
    assert not bad.mask_png
    for image_id, response in responses.items():
        assert not response.HasField("error") and response.mask_png, image_id
        assert response.width == 40 + int(image_id.split("-")[1])


def test_a_stream_beyond_the_queue_gets_per_item_refusals_not_a_dead_stream(
    gated: tuple[ServerThread, Gate], stub: pb_grpc.SegmenterStub
) -> None:
    server, gate = gated
    gate.open.clear()
    try:
        holders = [stub.Segment.future(pb.SegmentRequest(image=IMAGE), timeout=60) for _ in range(MAX_QUEUE)]
        wait_until(lambda: server.app.pipeline.in_flight == MAX_QUEUE, "the queue is full")
        responses = list(
            stub.SegmentStream(iter([pb.SegmentRequest(id=str(i), image=IMAGE) for i in range(3)]), timeout=30)
        )
    finally:
        gate.open.set()
    assert sorted(r.id for r in responses) == ["0", "1", "2"]
    assert all(r.error.code == grpc.StatusCode.RESOURCE_EXHAUSTED.value[0] for r in responses)
    for holder in holders:
        holder.result(timeout=60)


def test_a_real_flood_gets_only_answers_and_refusals() -> None:
    """The real model this time: 80 calls at once against a queue of 8. Each is answered or refused
    RESOURCE_EXHAUSTED, nothing else; the latencies are printed for the record, not asserted."""
    server = ServerThread(make_settings(max_queue=8, warmup=False))
    try:
        with grpc.insecure_channel(server.target) as channel:
            stub = pb_grpc.SegmenterStub(channel)
            stub.Segment(pb.SegmentRequest(image=IMAGE), timeout=60)  # connected and warm
            finished: dict[str, list[float]] = {"OK": [], "RESOURCE_EXHAUSTED": []}
            others: list[str] = []
            lock = threading.Lock()

            def done(call: grpc.Future) -> None:
                elapsed = time.monotonic() - started
                error = call.exception()
                code = "OK" if error is None else error.code().name  # type: ignore[attr-defined]
                with lock:
                    if code in finished:
                        finished[code].append(elapsed)
                    else:
                        others.append(code)

            started = time.monotonic()
            calls = [stub.Segment.future(pb.SegmentRequest(image=IMAGE), timeout=60) for _ in range(80)]
            for call in calls:
                call.add_done_callback(done)
            for call in calls:
                call.exception(timeout=60)
            wait_until(lambda: len(others) + sum(map(len, finished.values())) == len(calls), "every call is counted")
    finally:
        server.stop()
    assert not others, others
    assert finished["OK"] and finished["RESOURCE_EXHAUSTED"]
    ok = sorted(finished["OK"])
    print(
        f"\nflood: {len(ok)} admitted (p50 {ok[len(ok) // 2] * 1000:.0f} ms, p99 {ok[int(len(ok) * 0.99)] * 1000:.0f} ms), "
        f"{len(finished['RESOURCE_EXHAUSTED'])} refused (slowest refusal {max(finished['RESOURCE_EXHAUSTED']) * 1000:.0f} ms)"
    )
