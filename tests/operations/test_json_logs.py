"""SEGSERVE_LOG_FORMAT=json: `python -m server` writes nothing but JSON lines, from start-up to its stop, each with
time, level, logger and message; the access line's fields are fields of its own, and a traced call's lines carry
the caller's trace id."""

from __future__ import annotations

import datetime
import json

import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider

from client import SegmentClient
from tests.helpers.images import encode, photo_like
from tests.helpers.processes import start_server, wait_for_status
from tests.tracing.receiver import OtlpReceiver

pytestmark = pytest.mark.slow

SERVING = 1


def test_json_log_format_gives_only_json_lines_with_the_access_fields_and_trace_ids() -> None:
    caller = TracerProvider().get_tracer("the-caller")
    with OtlpReceiver() as receiver:
        process, target = start_server(
            *("--weights", "random", "--runtime", "torch", "--no-warmup", "--max-size", "64"),
            env={"SEGSERVE_LOG_FORMAT": "json", "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint},
        )
        try:
            wait_for_status(target, SERVING, timeout=180)
            with caller.start_as_current_span("caller") as span, SegmentClient(target, timeout=60) as client:
                client.segment(encode(photo_like(64, 48), "PNG"), request_id="json-logs-call")
        finally:
            process.terminate()
            output, _ = process.communicate(timeout=30)
    lines = [line for line in output.splitlines() if line.strip()]
    assert len(lines) > 5, output
    records = []
    for line in lines:
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            pytest.fail(f"a line that is not JSON: {line!r}")
        assert isinstance(record, dict), line
        assert {"time", "level", "logger", "message"} <= set(record), line
        datetime.datetime.fromisoformat(record["time"])
        records.append(record)
    access = [r for r in records if r["logger"] == "segserve.access"]
    assert len(access) == 1, access
    (line,) = access
    assert line["request_id"] == "json-logs-call"
    assert line["method"] == "Segment" and line["status"] == "OK" and line["protocol"] == "segmenter-grpc"
    assert line["width"] == 64 and line["batch_size"] == 1 and isinstance(line["ms"], float)
    assert line["message"] == "Segment OK", "the fields are the record's, not a JSON string in its message"
    assert line["trace_id"] == trace.format_trace_id(span.get_span_context().trace_id)
    assert len(line["span_id"]) == 16
    assert any(r["message"] == "stopped" for r in records), "the server's own lines to its end"
    outside = [r for r in records if r["message"] == "stopped" or r["message"].startswith("listening on port")]
    assert outside and all("trace_id" not in r for r in outside), "lines written outside any span: no ids"
