"""Streams bounded by bytes (issue 21): a stream's requests read and not yet answered and its responses not
yet sent count against SEGSERVE_STREAM_MAX_BYTES per stream and SEGSERVE_STREAM_BUDGET_BYTES across streams
and HTTP responses; gRPC takes in no more than SEGSERVE_HTTP2_WINDOW_BYTES per call before the server reads.
The memory these bound, measured, is in docs/operations.md."""

from __future__ import annotations

import asyncio
import time
import urllib.error
import urllib.request
from collections.abc import Iterator

import grpc
import pytest

from protos.inference import grpc_predict_v2_pb2 as ipb
from protos.inference import grpc_predict_v2_pb2_grpc as ipb_grpc
from protos.segserve.v1 import segserve_pb2 as pb
from protos.segserve.v1 import segserve_pb2_grpc as pb_grpc
from server.core.stream_bytes import StreamBudget
from server.inference import tensors
from server.rest.middleware import CountedResponses
from tests.helpers.gate import sample, wait_until
from tests.helpers.images import encode, photo_like
from tests.helpers.servers import ServerThread, make_settings

MiB = 1024 * 1024
MAX_QUEUE = 4  # the stream window by count
# Overlay responses of this photo are about 0.7 MB: the byte cap, not the window's 4 places, stops a stream.
BIG = encode(photo_like(1600, 1200), "JPEG", quality=95)
SMALL = encode(photo_like(64, 48), "JPEG")
CAP = 2 * MiB
WINDOW = 256 * 1024


@pytest.fixture(scope="module")
def server() -> Iterator[ServerThread]:
    server = ServerThread(
        make_settings(
            max_queue=MAX_QUEUE,
            stream_max_bytes=CAP,
            stream_budget_bytes=CAP,
            http2_window_bytes=WINDOW,
            warmup=False,
        )
    )
    yield server
    server.stop()


def images_made(server: ServerThread) -> int:
    counts = server.app.pipeline.batch_size_counts
    return sum(count * size for size, count in enumerate(counts, start=1))


def overlay_requests(total: int, pulled: list[int]) -> Iterator[pb.SegmentRequest]:
    for i in range(total):
        pulled[0] += 1
        yield pb.SegmentRequest(id=str(i), image=BIG, options=pb.SegmentOptions(overlay=True))


def nothing_in_progress(server: ServerThread) -> bool:
    """Every image admitted has its response made, waiting to be sent."""
    return server.app.pipeline.in_flight == sample(server, "segserve_stream_responses_unsent")


def assert_nothing_held(server: ServerThread) -> None:
    wait_until(lambda: sample(server, "segserve_stream_bytes_held") == 0, "every stream byte is given back")
    assert sample(server, "segserve_streams_paused") == 0
    wait_until(lambda: server.app.pipeline.in_flight == 0, "every queue place is given back")


def test_a_stream_whose_caller_stops_reading_stops_at_its_byte_cap_and_resumes_when_read(
    server: ServerThread,
) -> None:
    total = 20
    pulled = [0]
    with grpc.insecure_channel(server.target) as channel:
        responses = pb_grpc.SegmenterStub(channel).SegmentStream(overlay_requests(total, pulled), timeout=120)
        first = next(responses)  # from now on the caller reads nothing
        assert first.overlay_png
        wait_until(lambda: sample(server, "segserve_streams_paused") == 1, "the stream stops reading for bytes")
        wait_until(lambda: nothing_in_progress(server), "the images read are made")
        held = sample(server, "segserve_stream_bytes_held")
        unsent = sample(server, "segserve_stream_responses_unsent")
        made = images_made(server)
        time.sleep(2)
        assert images_made(server) == made, "the model kept working for a stream past its byte cap"
        print(f"paused at {held / MiB:.2f} MiB held, {unsent:.0f} responses unsent, caller pulled {pulled[0]}")
        assert held >= CAP, "paused before its cap"
        assert unsent < MAX_QUEUE, "the window's places, not the byte cap, stopped the stream"
        assert sample(server, "segserve_stream_max_bytes") == CAP
        rest = [r.id for r in responses]
    assert sorted([first.id, *rest], key=int) == [str(i) for i in range(total)]
    assert_nothing_held(server)


def test_past_the_server_wide_cap_other_streams_and_http_are_refused_until_the_holder_reads(
    server: ServerThread,
) -> None:
    pulled = [0]
    http = f"http://127.0.0.1:{server.app.http_port}/v1/segment"

    def post() -> tuple[int, str]:
        request = urllib.request.Request(http, data=SMALL, headers={"Content-Type": "image/jpeg"})
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                return int(response.status), ""
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read().decode()

    with grpc.insecure_channel(server.target) as channel:
        stub = pb_grpc.SegmenterStub(channel)
        holder = stub.SegmentStream(overlay_requests(12, pulled), timeout=120)
        first = next(holder)
        wait_until(lambda: sample(server, "segserve_streams_paused") == 1, "the holder stops reading")
        assert sample(server, "segserve_stream_budget_bytes") == CAP
        assert sample(server, "segserve_stream_bytes_held") >= CAP
        (refused,) = stub.SegmentStream(iter([pb.SegmentRequest(id="other", image=SMALL)]), timeout=30)
        assert refused.error.code == grpc.StatusCode.RESOURCE_EXHAUSTED.value[0], refused
        assert f"SEGSERVE_STREAM_BUDGET_BYTES={CAP}" in refused.error.message
        status, body = post()
        assert status == 429 and f"SEGSERVE_STREAM_BUDGET_BYTES={CAP}" in body, (status, body)
        rest = [r.id for r in holder]  # the holder reads: everything it held is sent and given back
        assert len([first.id, *rest]) == 12
        assert_nothing_held(server)
        (served,) = stub.SegmentStream(iter([pb.SegmentRequest(id="other", image=SMALL)]), timeout=30)
        assert served.mask_png and not served.HasField("error")
        assert post()[0] == 200


def test_model_stream_infer_stops_at_its_byte_cap_and_resumes_when_read(server: ServerThread) -> None:
    total = 12
    pulled = [0]

    def requests() -> Iterator[ipb.ModelInferRequest]:
        tensor = ipb.ModelInferRequest.InferInputTensor(name="IMAGE", datatype="BYTES", shape=[1])
        for i in range(total):
            pulled[0] += 1
            yield ipb.ModelInferRequest(
                model_name="deeplabv3_mobilenet_v3_large",
                id=str(i),
                inputs=[tensor],
                raw_input_contents=[tensors.to_raw([BIG])],
                parameters={"overlay": ipb.InferParameter(bool_param=True)},
            )

    with grpc.insecure_channel(server.target) as channel:
        responses = ipb_grpc.GRPCInferenceServiceStub(channel).ModelStreamInfer(requests(), timeout=120)
        first = next(responses)
        assert not first.error_message, first.error_message
        wait_until(lambda: sample(server, "segserve_streams_paused") == 1, "the stream stops reading for bytes")
        wait_until(lambda: server.app.pipeline.in_flight == 0, "the images read are made")  # in order: unqueued
        made = images_made(server)
        time.sleep(2)
        assert images_made(server) == made, "the model kept working for a stream past its byte cap"
        assert sample(server, "segserve_stream_bytes_held") >= CAP
        rest = [r.infer_response.id for r in responses]
    assert [first.infer_response.id, *rest] == [str(i) for i in range(total)]
    assert_nothing_held(server)


def test_grpc_takes_in_no_more_than_its_window_for_a_stream_the_server_does_not_read(
    server: ServerThread,
) -> None:
    """With BDP probing on, gRPC grows each call's receive window to 4 MiB or more, and what it takes in
    for a stream that has stopped reading is held by no count of ours (on a fast host, all 200 requests of
    the scenario's stalled stream left their caller)."""
    pulled = [0]
    made_before = images_made(server)
    with grpc.insecure_channel(server.target) as channel:
        responses = pb_grpc.SegmenterStub(channel).SegmentStream(overlay_requests(60, pulled), timeout=120)
        next(responses)
        wait_until(lambda: sample(server, "segserve_streams_paused") == 1, "the stream stops reading for bytes")
        time.sleep(3)  # time for the images read to be made, and for the caller to push what the windows admit
        read_by_server = images_made(server) - made_before
        print(f"caller pulled {pulled[0]} requests, the server read {read_by_server}")
        responses.cancel()
    # Between the server's window (256 KiB) and what the caller's own channel has accepted to send, about a
    # megabyte; gRPC's auto-tuned window alone is 4 MiB or more.
    unread = (pulled[0] - read_by_server) * len(BIG)
    assert unread < 2 * MiB, f"{unread / MiB:.1f} MiB of requests were taken in unread"
    assert_nothing_held(server)


def test_an_http_response_counts_against_the_budget_while_it_is_being_sent() -> None:
    budget = StreamBudget(limit=10 * MiB, per_stream=10 * MiB)
    body = b"x" * MiB

    async def app(scope: dict[str, object], receive: object, send: object) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})  # type: ignore[operator]
        await send({"type": "http.response.body", "body": body})  # type: ignore[operator]

    async def scenario() -> list[int]:
        taken = asyncio.Event()
        seen: list[int] = []

        async def slow_send(message: dict[str, object]) -> None:
            if message["type"] == "http.response.body":
                seen.append(budget.held)
                await taken.wait()  # the caller is not reading

        counted = CountedResponses(app, budget.stream)  # type: ignore[arg-type]
        sending = asyncio.create_task(counted({"type": "http"}, None, slow_send))  # type: ignore[arg-type]
        await asyncio.sleep(0.05)
        seen.append(budget.held)
        taken.set()
        await sending
        seen.append(budget.held)
        return seen

    assert asyncio.run(scenario()) == [MiB, MiB, 0]
