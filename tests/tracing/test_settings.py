"""How the OTEL_ environment turns tracing on and off (server/operations/tracing.py), without a server; and the
OTLP/HTTP path with a sampler from the environment, in a child `python -m server`."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from opentelemetry import trace
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2
from opentelemetry.sdk.trace import TracerProvider

from client import SegmentClient
from client.security import request_metadata
from server.operations.tracing import TracingSettingsError, _protocol, exporter_wanted
from tests.helpers.images import encode, photo_like
from tests.helpers.processes import start_server, wait_for_status


@pytest.mark.parametrize(
    ("environ", "wanted"),
    [
        ({}, None),  # off by default
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4317"}, "otlp"),  # the endpoint alone turns it on
        ({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://127.0.0.1:4318/v1/traces"}, "otlp"),
        ({"OTEL_TRACES_EXPORTER": "otlp"}, "otlp"),
        ({"OTEL_TRACES_EXPORTER": "console"}, "console"),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4317", "OTEL_TRACES_EXPORTER": "none"}, None),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4317", "OTEL_SDK_DISABLED": "true"}, None),
    ],
)
def test_which_environment_turns_tracing_on(environ: dict[str, str], wanted: str | None) -> None:
    assert exporter_wanted(environ) == wanted


def test_settings_it_cannot_serve_are_refused_by_name() -> None:
    with pytest.raises(TracingSettingsError, match="OTEL_TRACES_EXPORTER"):
        exporter_wanted({"OTEL_TRACES_EXPORTER": "zipkin"})
    with pytest.raises(TracingSettingsError, match="OTEL_EXPORTER_OTLP_PROTOCOL"):
        _protocol({"OTEL_EXPORTER_OTLP_PROTOCOL": "http/json"})
    assert _protocol({}) == "grpc" and _protocol({"OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf"}) == "http/protobuf"


def test_the_client_sends_the_current_trace_and_nothing_outside_one() -> None:
    assert [key for key, _ in request_metadata("r")] == ["x-request-id"]
    with TracerProvider().get_tracer("t").start_as_current_span("caller") as span:
        metadata = dict(request_metadata("r"))
    context = span.get_span_context()
    version, trace_id, parent_id, flags = metadata["traceparent"].split("-")
    assert (version, trace_id, parent_id) == (
        "00",
        trace.format_trace_id(context.trace_id),
        trace.format_span_id(context.span_id),
    )
    assert int(flags, 16) & 1, "sampled"


class _Receiver(BaseHTTPRequestHandler):
    """OTLP/HTTP's trace endpoint: POST /v1/traces, a protobuf ExportTraceServiceRequest."""

    received: list[tuple[str, str]] = []  # (name, trace id) of every span, shared by the handlers

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["content-length"]))
        request = trace_service_pb2.ExportTraceServiceRequest.FromString(body)
        for resource_spans in request.resource_spans:
            for scope_spans in resource_spans.scope_spans:
                self.received.extend((s.name, s.trace_id.hex()) for s in scope_spans.spans)
        payload = trace_service_pb2.ExportTraceServiceResponse().SerializeToString()
        self.send_response(200 if self.path == "/v1/traces" else 404)
        self.send_header("content-type", "application/x-protobuf")
        self.send_header("content-length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def http_receiver() -> Iterator[tuple[str, list[tuple[str, str]]]]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Receiver)
    _Receiver.received = []
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", _Receiver.received
    server.shutdown()


@pytest.mark.slow
def test_otlp_over_http_with_the_environments_sampler(http_receiver: tuple[str, list[tuple[str, str]]]) -> None:
    """OTEL_EXPORTER_OTLP_PROTOCOL=http/protobuf sends to ENDPOINT/v1/traces; OTEL_TRACES_SAMPLER with a ratio of
    0 samples no trace the server starts itself (the model's start), and still follows a caller's sampled one."""
    endpoint, received = http_receiver
    process, target = start_server(
        *("--weights", "random", "--runtime", "torch", "--no-warmup", "--max-size", "64", "--http-port", "-1"),
        env={
            "OTEL_EXPORTER_OTLP_ENDPOINT": endpoint,
            "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf",
            "OTEL_TRACES_SAMPLER": "parentbased_traceidratio",
            "OTEL_TRACES_SAMPLER_ARG": "0",
            "OTEL_BSP_SCHEDULE_DELAY": "100",
        },
    )
    try:
        wait_for_status(target, 1, timeout=180)
        caller = TracerProvider().get_tracer("the-caller")
        with caller.start_as_current_span("caller") as span, SegmentClient(target, timeout=60) as client:
            client.segment(encode(photo_like(64, 48), "PNG"))
        trace_id = trace.format_trace_id(span.get_span_context().trace_id)
        wait = threading.Event()
        for _ in range(300):
            if ("segserve.v1.Segmenter/Segment", trace_id) in received:
                break
            wait.wait(0.05)
    finally:
        process.terminate()
        process.communicate(timeout=30)
    assert ("segserve.v1.Segmenter/Segment", trace_id) in received, received
    assert {"segment image", "queue", "batch", "model"} <= {name for name, t in received if t == trace_id}
    assert not any(name == "start model" for name, _ in received), "a root the ratio 0 sampler drops"
