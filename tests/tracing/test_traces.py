"""Traces end to end: `python -m server` as a child, tracing turned on by the standard variable alone
(OTEL_EXPORTER_OTLP_ENDPOINT), exporting to a real OTLP receiver (tests/tracing/receiver.py); each door, a stream
and a batch shared by several callers give the expected span tree, in the caller's own trace (the test is the
caller: its span's traceparent goes with each call, sent by the client library or put in the HTTP headers)."""

from __future__ import annotations

import base64
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import httpx
import pytest
import tritonclient.http
from opentelemetry import propagate, trace
from opentelemetry.sdk.trace import TracerProvider
from tritonclient.utils import InferenceServerException

from client import SegmentClient
from protos.inference import grpc_predict_v2_pb2 as inference_pb
from protos.inference import grpc_predict_v2_pb2_grpc as inference_pb_grpc
from tests.helpers.images import encode, photo_like
from tests.helpers.known_model import MODEL_NAME
from tests.helpers.processes import ROOT, free_port, start_server, wait_for_status
from tests.tracing.receiver import OtlpReceiver, ReceivedSpan, children, render, tree

pytestmark = pytest.mark.slow

SERVING = 1
IMAGE = ("segment image", [("decode and resize", []), ("queue", []), ("batch", [("model", [])]), ("postprocess", [])])
"""A lone image's tree: its batch is a child of its own span, since it is the batch's only (so oldest) image."""
BATCH_DELAY_MS = 1500
"""Long enough that callers sent together share one batch (the test checks they did)."""
SHARED = 3


class Server:
    def __init__(self, target: str, http: str, receiver: OtlpReceiver) -> None:
        self.target, self.http, self.receiver = target, http, receiver


@pytest.fixture(scope="module")
def traced() -> Iterator[Server]:
    http_port = free_port()
    with OtlpReceiver() as receiver:
        process, target = start_server(
            *("--weights", "random", "--runtime", "torch", "--no-warmup", "--max-size", "64"),
            *("--http-port", str(http_port), "--max-batch-size", "4", "--no-adaptive-batching"),
            *("--max-batch-delay-ms", str(BATCH_DELAY_MS)),
            env={
                "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint,  # alone: turns tracing on, over OTLP/gRPC
                "OTEL_SERVICE_NAME": "segserve-under-test",
                "OTEL_BSP_SCHEDULE_DELAY": "100",
            },
        )
        try:
            wait_for_status(target, SERVING, timeout=180)
            yield Server(target, f"http://127.0.0.1:{http_port}", receiver)
        finally:
            process.terminate()
            output, _ = process.communicate(timeout=30)
            print(output[-3000:])


@pytest.fixture(scope="module")
def caller() -> trace.Tracer:
    """The caller's tracer: an SDK provider of the test's own, never the process's global one (other tests'
    in-process servers must not start tracing)."""
    return TracerProvider().get_tracer("the-caller")


@pytest.fixture
def image() -> bytes:
    return encode(photo_like(96, 64), "PNG")


def _door(server: Server, caller_span: trace.Span, name: str) -> tuple[ReceivedSpan, list[ReceivedSpan]]:
    """The server's span for the call, a child of the caller's span, and every span of the caller's trace."""
    context = caller_span.get_span_context()
    trace_id = trace.format_trace_id(context.trace_id)
    spans = server.receiver.wait_for(trace_id, name)
    door = next(s for s in spans if s.name == name)
    assert door.parent_id == trace.format_span_id(context.span_id), "the call's span continues the caller's"
    assert door.kind == "SERVER"
    assert door.service == "segserve-under-test"  # OTEL_SERVICE_NAME
    return door, spans


def _check_image(spans: list[ReceivedSpan], image_span: ReceivedSpan, batch_size: int = 1) -> None:
    """One image's spans: decode, its wait (linked to the batch it ran in), postprocess; the batch has the size."""
    names = [c.name for c in children(spans, image_span)]
    assert names[:2] == ["decode and resize", "queue"] and names[-1] == "postprocess", names
    queue = next(c for c in children(spans, image_span) if c.name == "queue")
    assert len(queue.links) == 1, "the wait links to its batch"
    assert queue.attributes["segserve.batch.size"] == batch_size


def test_segment_continues_the_callers_trace_with_every_stage(
    traced: Server, caller: trace.Tracer, image: bytes
) -> None:
    with caller.start_as_current_span("caller") as span, SegmentClient(traced.target, timeout=60) as client:
        result = client.segment(image)
    door, spans = _door(traced, span, "segserve.v1.Segmenter/Segment")
    assert tree(spans, door) == ("segserve.v1.Segmenter/Segment", [IMAGE])
    (image_span,) = children(spans, door)
    _check_image(spans, image_span)
    assert image_span.attributes["segserve.image.width"] == 96
    batch = next(s for s in spans if s.name == "batch")
    assert batch.attributes["segserve.batch.size"] == result.timing.batch_size == 1
    assert batch.attributes["segserve.runtime"], "the runtime that ran the batch"
    assert door.attributes["rpc.grpc.status_code"] == 0
    assert door.attributes["segserve.request_id"]
    print(render(spans, door, ("segserve.batch.size", "segserve.runtime")))


def test_segment_upload(traced: Server, caller: trace.Tracer, image: bytes) -> None:
    with (
        caller.start_as_current_span("caller") as span,
        SegmentClient(traced.target, timeout=60, upload_threshold=16) as client,
    ):
        client.segment(image)
    door, spans = _door(traced, span, "segserve.v1.Segmenter/SegmentUpload")
    assert tree(spans, door) == ("segserve.v1.Segmenter/SegmentUpload", [IMAGE])


def _traced_headers() -> dict[str, str]:
    headers: dict[str, str] = {}
    propagate.inject(headers)
    assert "traceparent" in headers
    return headers


def test_http_segment(traced: Server, caller: trace.Tracer, image: bytes) -> None:
    with caller.start_as_current_span("caller") as span:
        headers = {**_traced_headers(), "content-type": "image/png"}
        answer = httpx.post(f"{traced.http}/v1/segment", content=image, headers=headers, timeout=60)
    assert answer.status_code == 200, answer.text
    door, spans = _door(traced, span, "POST /v1/segment")
    assert tree(spans, door) == ("POST /v1/segment", [IMAGE])
    assert door.attributes["http.response.status_code"] == 200
    assert door.attributes["segserve.request_id"] == answer.headers["x-request-id"]


def _images_of_request(spans: list[ReceivedSpan], door: ReceivedSpan, count: int) -> None:
    """ModelInfer's images: one span each under the call, each through every stage; the batch they shared (or
    each its own) holds the model's call."""
    images = children(spans, door)
    assert [s.name for s in images] == ["segment image"] * count
    batch_ids = set()
    for image_span in images:
        queue = next(c for c in children(spans, image_span) if c.name == "queue")
        _check_image(spans, image_span, int(queue.attributes["segserve.batch.size"]))
        batch_ids.add(queue.links[0][1])
    batches = [s for s in spans if s.span_id in batch_ids]
    assert len(batches) == len(batch_ids), "every batch an image waited for is in the trace"
    assert sum(int(b.attributes["segserve.batch.size"]) for b in batches) == count
    for batch in batches:
        assert [c.name for c in children(spans, batch)] == ["model"]


def test_model_infer_over_grpc(traced: Server, caller: trace.Tracer, image: bytes) -> None:
    request = inference_pb.ModelInferRequest(
        model_name=MODEL_NAME,
        inputs=[
            inference_pb.ModelInferRequest.InferInputTensor(
                name="IMAGE",
                datatype="BYTES",
                shape=[2],
                contents=inference_pb.InferTensorContents(bytes_contents=[image, image]),
            )
        ],
        outputs=[inference_pb.ModelInferRequest.InferRequestedOutputTensor(name="CLASSES")],
    )
    with caller.start_as_current_span("caller") as span, grpc.insecure_channel(traced.target) as channel:
        metadata = tuple(_traced_headers().items())
        inference_pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request, timeout=60, metadata=metadata)
    door, spans = _door(traced, span, "inference.GRPCInferenceService/ModelInfer")
    _images_of_request(spans, door, 2)


def test_model_infer_over_http(traced: Server, caller: trace.Tracer, image: bytes) -> None:
    body = {
        "inputs": [{"name": "IMAGE", "datatype": "BYTES", "shape": [1], "data": [base64.b64encode(image).decode()]}],
        "outputs": [{"name": "CLASSES"}],
    }
    with caller.start_as_current_span("caller") as span:
        url = f"{traced.http}/v2/models/{MODEL_NAME}/infer"
        answer = httpx.post(url, json=body, headers=_traced_headers(), timeout=60)
    assert answer.status_code == 200, answer.text
    door, spans = _door(traced, span, "POST /v2/models/{model}/infer")
    assert tree(spans, door) == ("POST /v2/models/{model}/infer", [IMAGE])


def test_a_stream_and_each_of_its_items(traced: Server, caller: trace.Tracer, image: bytes) -> None:
    with caller.start_as_current_span("caller") as span, SegmentClient(traced.target, timeout=60) as client:
        results = list(client.segment_many([image, image, image]))
    assert all(r.error is None for r in results)
    door, spans = _door(traced, span, "segserve.v1.Segmenter/SegmentStream")
    items = children(spans, door)
    assert [s.name for s in items] == ["stream item"] * 3
    assert sorted(str(s.attributes["segserve.request_id"]) for s in items) == ["0", "1", "2"]
    for item in items:
        (image_span,) = children(spans, item)
        assert image_span.name == "segment image"
        queue = next(c for c in children(spans, image_span) if c.name == "queue")
        _check_image(spans, image_span, int(queue.attributes["segserve.batch.size"]))


def _calls_at_once(traced: Server, caller: trace.Tracer, image: bytes) -> dict[int, tuple[trace.Span, int]]:
    """SHARED Segment calls sent at once, each from its own caller span: each span and its batch's size."""
    barrier = threading.Barrier(SHARED)
    found: dict[int, tuple[trace.Span, int]] = {}

    def call(i: int) -> None:
        with SegmentClient(traced.target, timeout=60) as client:
            client.health()  # connected before the barrier, so the calls leave together
            with caller.start_as_current_span(f"caller {i}") as span:
                barrier.wait()
                found[i] = (span, client.segment(image).timing.batch_size)

    threads = [threading.Thread(target=call, args=(i,)) for i in range(SHARED)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    return found


def test_a_batch_shared_by_several_callers_is_one_span_each_of_them_finds(
    traced: Server, caller: trace.Tracer, image: bytes
) -> None:
    """Several callers, each in a trace of its own, whose images ran in one batch: one batch span, of the size
    the responses say, linked from each caller's wait and linking to each of them."""
    found: dict[int, tuple[trace.Span, int]] = {}
    for _attempt in range(6):  # callers sent together can still miss each other on a busy machine: try again
        found = _calls_at_once(traced, caller, image)
        if sorted(size for _, size in found.values()) == [SHARED] * SHARED:
            break
    assert sorted(size for _, size in found.values()) == [SHARED] * SHARED, "the callers shared one batch"
    waits: list[ReceivedSpan] = []
    trace_ids = set()
    for span, _ in found.values():
        door, spans = _door(traced, span, "segserve.v1.Segmenter/Segment")
        trace_ids.add(door.trace_id)
        (image_span,) = children(spans, door)
        _check_image(spans, image_span, SHARED)
        waits.append(next(c for c in children(spans, image_span) if c.name == "queue"))
    assert len(trace_ids) == SHARED, "each caller its own trace"
    (batch_link,) = {w.links[0] for w in waits}
    batch = traced.receiver.span(batch_link[1])
    assert batch is not None and batch.name == "batch"
    assert batch.attributes["segserve.batch.size"] == SHARED
    assert sorted(batch.links) == sorted((w.trace_id, w.span_id) for w in waits), "the batch links to every wait"
    assert batch.trace_id in trace_ids, "the batch is in the trace of the caller whose image came first"
    assert sum(s.name == "batch" and s.span_id == batch.span_id for s in traced.receiver.spans) == 1


def test_trace_settings_over_both_doors(traced: Server, caller: trace.Tracer, image: bytes) -> None:
    """Triton's trace extension answers: OFF stops sampling, TIMESTAMPS and a rate start it again; what has no
    meaning here is refused with the reason."""
    setting = httpx.get(f"{traced.http}/v2/trace/setting", timeout=10)
    assert setting.json()["trace_level"] == ["TIMESTAMPS"] and setting.json()["trace_mode"] == "opentelemetry"
    with grpc.insecure_channel(traced.target) as channel:
        stub = inference_pb_grpc.GRPCInferenceServiceStub(channel)
        value = inference_pb.TraceSettingRequest.SettingValue
        off = stub.TraceSetting(inference_pb.TraceSettingRequest(settings={"trace_level": value(value=["OFF"])}))
        assert list(off.settings["trace_level"].value) == ["OFF"]
        with caller.start_as_current_span("while off") as untraced, SegmentClient(traced.target, timeout=60) as client:
            client.segment(image)
        with pytest.raises(grpc.RpcError) as refused:
            stub.TraceSetting(inference_pb.TraceSettingRequest(settings={"trace_level": value(value=["TENSORS"])}))
        assert refused.value.code() == grpc.StatusCode.UNIMPLEMENTED
        assert "never tensors" in str(refused.value.details())
    answer = httpx.post(f"{traced.http}/v2/trace/setting", json={"trace_file": "/tmp/x.json"}, timeout=10)
    assert answer.status_code == 501 and "trace file" in answer.json()["error"]
    back = httpx.post(f"{traced.http}/v2/trace/setting", json={"trace_level": ["TIMESTAMPS"], "trace_rate": "1"})
    assert back.json()["trace_level"] == ["TIMESTAMPS"] and back.json()["trace_rate"] == "1"
    triton = tritonclient.http.InferenceServerClient(traced.http.removeprefix("http://"))
    assert triton.update_trace_settings(settings={"trace_rate": "10"})["trace_rate"] == "10"  # Triton's own client
    assert triton.update_trace_settings(settings={"trace_rate": None})["trace_rate"] == "1"  # back to the start's
    with pytest.raises(InferenceServerException, match="whole server"):
        triton.update_trace_settings(model_name=MODEL_NAME, settings={"trace_rate": "2"})
    with caller.start_as_current_span("on again") as span, SegmentClient(traced.target, timeout=60) as client:
        client.segment(image)
    _door(traced, span, "segserve.v1.Segmenter/Segment")  # exported after what the call while off would have been
    assert traced.receiver.of_trace(trace.format_trace_id(untraced.get_span_context().trace_id)) == []


def test_the_models_start_is_a_trace_with_its_phases(traced: Server) -> None:
    deadline = time.monotonic() + 15
    while not any(s.name == "start model" for s in traced.receiver.spans) and time.monotonic() < deadline:
        time.sleep(0.05)
    spans = traced.receiver.spans
    (start,) = [s for s in spans if s.name == "start model"]
    assert start.parent_id == "" and start.attributes["segserve.model"] == MODEL_NAME
    (build,) = children(spans, start)
    print(build.name, build.events)
    assert build.name == "build runtime"  # and no "warm up": the server runs with --no-warmup
    assert build.events, "the load's phases"


def test_the_cli_traces_its_command_and_the_server_continues_it(traced: Server, image: bytes, tmp_path: Path) -> None:
    """`python -m client segment` with OTEL_EXPORTER_OTLP_ENDPOINT set: its own span (service segserve-client),
    and under it the server's call with every stage (the trace the README shows)."""
    photo = tmp_path / "photo.png"
    photo.write_bytes(image)
    done = subprocess.run(
        [sys.executable, "-m", "client", "--target", traced.target, "segment", str(photo), "--out", str(tmp_path)],
        env={**os.environ, "OTEL_EXPORTER_OTLP_ENDPOINT": traced.receiver.endpoint},
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        roots = [s for s in traced.receiver.spans if s.name == "python -m client segment"]
        if roots:
            break
        time.sleep(0.05)
    (root,) = roots
    assert root.service == "segserve-client" and root.kind == "CLIENT" and root.parent_id == ""
    spans = traced.receiver.wait_for(root.trace_id, "segserve.v1.Segmenter/Segment")
    assert tree(spans, root) == ("python -m client segment", [("segserve.v1.Segmenter/Segment", [IMAGE])])
    print(render(spans, root, ("segserve.batch.size", "segserve.runtime", "segserve.image.width")))
