"""What a caller can make the server hold, one mechanism at a time (the combined scenario against the
real process is tests/system/test_hostile_scenario.py): the upload byte budget, the upload idle timeout,
admission and draining at an upload's first chunk, a stream's window released only once a response
is sent, a stream cancelled midway, a stream whose request side fails, answers before the last request."""

from __future__ import annotations

import gc
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

MiB = 1024 * 1024
MAX_QUEUE = 4  # also the stream window here: min(STREAM_WINDOW, max_queue)
BUDGET = 3 * MiB
IDLE_S = 1.0
IMAGE = encode(photo_like(64, 48), "JPEG")
# Overlays of this size are megabytes each: a few fill the HTTP/2 windows between server and caller.
BIG = encode(photo_like(1600, 1200), "JPEG", quality=95)


@pytest.fixture(scope="module")
def gated() -> Iterator[tuple[ServerThread, Gate]]:
    gate = Gate()
    server = ServerThread(
        make_settings(
            max_queue=MAX_QUEUE,
            max_image_bytes=8 * MiB,
            upload_budget_bytes=BUDGET,
            upload_idle_timeout_s=IDLE_S,
            warmup=False,
        ),
        runtime_factory=gate.gated_runtime,
    )
    yield server, gate
    gate.open.set()
    server.stop()


@pytest.fixture
def server(gated: tuple[ServerThread, Gate]) -> ServerThread:
    return gated[0]


@pytest.fixture
def stub(server: ServerThread) -> Iterator[pb_grpc.SegmenterStub]:
    with grpc.insecure_channel(server.target) as channel:
        yield pb_grpc.SegmenterStub(channel)


def assert_all_let_go(server: ServerThread) -> None:
    """Nothing held once the calls are over: queue places, upload bytes, streams, unsent responses."""
    wait_until(lambda: server.app.pipeline.in_flight == 0, "every queue place is given back")
    wait_until(lambda: sample(server, "segserve_upload_bytes_in_flight") == 0, "upload bytes are let go")
    wait_until(lambda: sample(server, "segserve_streams_open") == 0, "no stream is open")
    assert sample(server, "segserve_stream_responses_unsent") == 0
    wait_until(
        lambda: (
            sum(sample(server, "segserve_requests_in_progress", method=m) for m in ("SegmentUpload", "SegmentStream"))
            == 0
        ),
        "no upload or stream call is in progress",
    )


def stalled_upload(first: bytes, release: threading.Event, image_id: str = "") -> Iterator[pb.ImageChunk]:
    """Sends its first chunk, then nothing until released (or 30 s)."""
    yield pb.ImageChunk(id=image_id, data=first)
    release.wait(30)


# ---- uploads ----------------------------------------------------------------------------------------


def test_an_upload_past_the_budget_is_refused_at_once_while_others_hold_it(
    server: ServerThread, stub: pb_grpc.SegmenterStub
) -> None:
    release = threading.Event()
    holder = stub.SegmentUpload.future(stalled_upload(b"\0" * (2 * MiB), release, "holder"), timeout=30)
    try:
        wait_until(lambda: sample(server, "segserve_upload_bytes_in_flight") == 2 * MiB, "the holder's bytes count")
        assert sample(server, "segserve_upload_budget_bytes") == BUDGET
        started = time.monotonic()
        with pytest.raises(grpc.RpcError) as info:
            stub.SegmentUpload(iter([pb.ImageChunk(data=b"\0" * MiB)] * 2), timeout=30)
        refused_after = time.monotonic() - started
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert f"SEGSERVE_UPLOAD_BUDGET_BYTES={BUDGET}" in (info.value.details() or "")
        assert not holder.done(), "the refusal came only after the holder ended"
        assert sample(server, "segserve_upload_bytes_in_flight") == 2 * MiB, "the refused call's bytes were kept"
        print(f"refused {refused_after * 1000:.0f} ms after sending, while 2 of {BUDGET // MiB} MiB were held")
    finally:
        release.set()
    error = holder.exception(timeout=30)
    assert isinstance(error, grpc.RpcError) and error.code() == grpc.StatusCode.INVALID_ARGUMENT  # zeros: no image
    assert_all_let_go(server)


def live_request_readers() -> int:
    """gRPC's per-call request readers still alive after a full collection: each keeps its call's state."""
    gc.collect()
    return sum(type(o).__name__ == "_MessageReceiver" for o in gc.get_objects())


def test_refused_uploads_leave_no_call_alive(server: ServerThread, stub: pb_grpc.SegmenterStub) -> None:
    """grpcio's request iterator, left unfinished by a refused upload, keeps its call alive for good (not
    even the cyclic collector frees it), so the server reads requests with context.read(). With every
    upload refused, issue 11's scenario grew +683 MiB in 60 s from this alone."""

    def too_big_then_more() -> Iterator[pb.ImageChunk]:
        yield pb.ImageChunk(data=b"\0" * (BUDGET + MiB))  # read, then refused: past the budget
        for _ in range(4):
            time.sleep(0.05)
            yield pb.ImageChunk(data=b"\0" * MiB)

    def refuse_some(calls: int) -> None:
        for _ in range(calls):
            with pytest.raises(grpc.RpcError) as info:
                stub.SegmentUpload(too_big_then_more(), timeout=30)
            assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED

    before = live_request_readers()
    callers = [threading.Thread(target=refuse_some, args=(15,)) for _ in range(4)]
    for caller in callers:
        caller.start()
    for caller in callers:
        caller.join(60)
    assert_all_let_go(server)
    left = live_request_readers() - before
    assert left <= 2, f"{left} of 60 refused uploads still hold their call"


def test_a_stalled_upload_is_ended_and_its_bytes_freed(server: ServerThread, stub: pb_grpc.SegmenterStub) -> None:
    release = threading.Event()
    started = time.monotonic()
    call = stub.SegmentUpload.future(stalled_upload(IMAGE[:1000], release, "stalled"), timeout=30)
    try:
        error = call.exception(timeout=30)
        ended_after = time.monotonic() - started
        assert isinstance(error, grpc.RpcError) and error.code() == grpc.StatusCode.DEADLINE_EXCEEDED, error
        assert "no chunk for 1 s (SEGSERVE_UPLOAD_IDLE_TIMEOUT_S)" in (error.details() or "")
        assert ended_after < 10, f"ended after {ended_after:.1f} s, not after the idle timeout"
        assert not release.is_set()  # the caller was still holding the call open
        assert_all_let_go(server)
    finally:
        release.set()


def test_a_draining_server_refuses_an_upload_at_its_first_chunk(
    server: ServerThread, stub: pb_grpc.SegmenterStub
) -> None:
    release = threading.Event()
    server.app.pipeline.draining = True
    try:
        call = stub.SegmentUpload.future(stalled_upload(IMAGE[:1000], release), timeout=30)
        # Refused at its first chunk, not ended by the idle timeout: the status and the message say which.
        error = call.exception(timeout=30)
        assert isinstance(error, grpc.RpcError) and error.code() == grpc.StatusCode.UNAVAILABLE, error
        assert "shutting down" in (error.details() or "") and "no chunk" not in (error.details() or "")
        assert not release.is_set()
    finally:
        server.app.pipeline.draining = False
        release.set()
    assert_all_let_go(server)


def test_an_upload_holds_a_queue_place_from_its_first_chunk_and_a_full_queue_refuses_it_there(
    gated: tuple[ServerThread, Gate], stub: pb_grpc.SegmenterStub
) -> None:
    server, gate = gated
    release = threading.Event()
    gate.open.clear()
    try:
        uploading = stub.SegmentUpload.future(stalled_upload(IMAGE[:1000], release), timeout=30)
        wait_until(lambda: sample(server, "segserve_queue_depth") == 1, "the upload holds a place")
        holders = [stub.Segment.future(pb.SegmentRequest(image=IMAGE), timeout=60) for _ in range(MAX_QUEUE - 1)]
        wait_until(lambda: server.app.pipeline.in_flight == MAX_QUEUE, "the queue is full")
        refused = stub.SegmentUpload.future(stalled_upload(IMAGE[:1000], release), timeout=30)
        error = refused.exception(timeout=30)  # the status and message show it was the queue, not the idle timeout
        assert isinstance(error, grpc.RpcError) and error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, error
        assert f"SEGSERVE_MAX_QUEUE={MAX_QUEUE}" in (error.details() or "")
        assert not release.is_set()
    finally:
        release.set()
        gate.open.set()
    for holder in holders:
        holder.result(timeout=60)
    uploading.exception(timeout=30)  # truncated by the release: an answer either way
    assert_all_let_go(server)


# ---- streams ----------------------------------------------------------------------------------------


def test_a_stream_answers_before_its_caller_has_sent_every_request(
    server: ServerThread, stub: pb_grpc.SegmenterStub
) -> None:
    first_answer = threading.Event()
    answered_before_the_rest: list[bool] = []

    def requests() -> Iterator[pb.SegmentRequest]:
        yield pb.SegmentRequest(id="0", image=IMAGE)
        answered_before_the_rest.append(first_answer.wait(20))
        for i in range(1, 4):
            yield pb.SegmentRequest(id=str(i), image=IMAGE)

    ids = []
    for response in stub.SegmentStream(requests(), timeout=60):
        ids.append(response.id)
        first_answer.set()
    assert answered_before_the_rest == [True], "the first answer came only after every request was sent"
    assert sorted(ids) == ["0", "1", "2", "3"]
    assert_all_let_go(server)


def test_a_caller_that_stops_reading_stops_the_stream(server: ServerThread, stub: pb_grpc.SegmenterStub) -> None:
    """With responses of megabytes, the window fills with unsent ones; then the server reads no more
    requests and the model makes no more masks, until the caller reads again."""
    total = 40
    pulled = 0

    def requests() -> Iterator[pb.SegmentRequest]:
        nonlocal pulled
        for i in range(total):
            pulled += 1
            yield pb.SegmentRequest(id=str(i), image=BIG, options=pb.SegmentOptions(overlay=True))

    pipeline = server.app.pipeline
    made_before = sum(pipeline.batch_size_counts[i] * (i + 1) for i in range(len(pipeline.batch_size_counts)))

    def made() -> int:
        counts = pipeline.batch_size_counts
        return sum(counts[i] * (i + 1) for i in range(len(counts))) - made_before

    responses = stub.SegmentStream(requests(), timeout=120)
    first = next(responses)  # the call is under way; from now on the caller reads nothing
    wait_until(lambda: sample(server, "segserve_stream_responses_unsent") == MAX_QUEUE, "the window is full")
    settled = made()
    time.sleep(3)
    assert made() == settled, "the model kept working for a caller that reads nothing"
    assert sample(server, "segserve_stream_responses_unsent") == MAX_QUEUE
    assert sample(server, "segserve_streams_open") == 1
    print(f"caller not reading: {settled} of {total} masks made, caller's iterator pulled {pulled}")
    assert settled < total // 2, f"{settled} of {total} masks were made for a caller that reads nothing"
    rest = [r.id for r in responses]
    assert sorted([first.id, *rest], key=int) == [str(i) for i in range(total)]
    assert_all_let_go(server)


def test_a_stream_cancelled_midway_frees_its_work_and_the_server_keeps_serving(
    server: ServerThread, stub: pb_grpc.SegmenterStub
) -> None:
    cancelled_before = sample(server, "segserve_requests_total", method="SegmentStream", code="CANCELLED")
    requests = (pb.SegmentRequest(id=str(i), image=BIG, options=pb.SegmentOptions(overlay=True)) for i in range(40))
    call = stub.SegmentStream(requests, timeout=120)
    assert next(call).id and next(call).id
    wait_until(lambda: sample(server, "segserve_stream_responses_unsent") > 0, "responses wait to be sent")
    assert server.app.pipeline.in_flight > 0
    call.cancel()
    wait_until(
        lambda: (
            sample(server, "segserve_requests_total", method="SegmentStream", code="CANCELLED") == cancelled_before + 1
        ),
        "the server sees the cancellation",
    )
    assert_all_let_go(server)
    assert stub.Segment(pb.SegmentRequest(image=IMAGE), timeout=60).width == 64


def test_a_stream_whose_request_side_fails_ends_with_a_status(server: ServerThread) -> None:
    """Bytes that are no SegmentRequest make the server's request iterator raise mid-stream; the call
    must still end (the image already read answered first), not hang until the caller's deadline."""
    with grpc.insecure_channel(server.target) as channel:
        raw = channel.stream_stream("/segserve.v1.Segmenter/SegmentStream")  # bytes in, bytes out
        good = pb.SegmentRequest(id="good", image=IMAGE).SerializeToString()
        started = time.monotonic()
        answers: list[bytes] = []

        def read_answers() -> None:
            answers.extend(raw(iter([good, b"\xff\xff\xff not a protobuf"]), timeout=30))

        with pytest.raises(grpc.RpcError) as info:
            read_answers()
        ended_after = time.monotonic() - started
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, info.value
    assert "could not be parsed" in (info.value.details() or "")
    assert ended_after < 15, f"the stream ended only after {ended_after:.1f} s"
    assert [pb.SegmentResponse.FromString(a).id for a in answers] == ["good"]
    assert_all_let_go(server)
