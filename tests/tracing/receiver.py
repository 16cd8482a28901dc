"""A real OTLP trace receiver on 127.0.0.1: the TraceService of opentelemetry-proto's generated code, served with
grpc, keeping every span it is sent; and the span tree of one trace as text (what the README shows)."""

from __future__ import annotations

import threading
import time
from concurrent import futures
from dataclasses import dataclass, field
from typing import Any

import grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

KINDS = {0: "UNSPECIFIED", 1: "INTERNAL", 2: "SERVER", 3: "CLIENT", 4: "PRODUCER", 5: "CONSUMER"}


@dataclass(frozen=True)
class ReceivedSpan:
    trace_id: str
    span_id: str
    parent_id: str
    name: str
    kind: str
    start_ns: int
    end_ns: int
    attributes: dict[str, Any]
    links: tuple[tuple[str, str], ...]
    events: tuple[str, ...]
    service: str
    status_code: int

    @property
    def ms(self) -> float:
        return (self.end_ns - self.start_ns) / 1e6


def _value(any_value: Any) -> Any:
    kind = any_value.WhichOneof("value")
    return getattr(any_value, kind) if kind else None


@dataclass
class _Service(trace_service_pb2_grpc.TraceServiceServicer):
    spans: list[ReceivedSpan] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def Export(self, request: Any, context: Any) -> Any:
        received = []
        for resource_spans in request.resource_spans:
            resource = {a.key: _value(a.value) for a in resource_spans.resource.attributes}
            for scope_spans in resource_spans.scope_spans:
                for s in scope_spans.spans:
                    received.append(
                        ReceivedSpan(
                            trace_id=s.trace_id.hex(),
                            span_id=s.span_id.hex(),
                            parent_id=s.parent_span_id.hex(),
                            name=s.name,
                            kind=KINDS.get(s.kind, str(s.kind)),
                            start_ns=s.start_time_unix_nano,
                            end_ns=s.end_time_unix_nano,
                            attributes={a.key: _value(a.value) for a in s.attributes},
                            links=tuple((link.trace_id.hex(), link.span_id.hex()) for link in s.links),
                            events=tuple(e.name for e in s.events),
                            service=str(resource.get("service.name", "")),
                            status_code=s.status.code,
                        )
                    )
        with self.lock:
            self.spans.extend(received)
        return trace_service_pb2.ExportTraceServiceResponse()


class OtlpReceiver:
    """Use as a context manager; `endpoint` is what OTEL_EXPORTER_OTLP_ENDPOINT takes."""

    def __init__(self) -> None:
        self._service = _Service()
        self._server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(self._service, self._server)
        self.port = self._server.add_insecure_port("127.0.0.1:0")
        self.endpoint = f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> OtlpReceiver:
        self._server.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.stop(0)

    @property
    def spans(self) -> list[ReceivedSpan]:
        with self._service.lock:
            return list(self._service.spans)

    def of_trace(self, trace_id: str) -> list[ReceivedSpan]:
        return [s for s in self.spans if s.trace_id == trace_id]

    def wait_for(self, trace_id: str, name: str, count: int = 1, timeout: float = 15) -> list[ReceivedSpan]:
        """The spans of `trace_id` once `count` spans called `name` (the last to end: the door's) are in."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            spans = self.of_trace(trace_id)
            if sum(s.name == name for s in spans) >= count:
                return spans
            time.sleep(0.05)
        names = sorted({s.name for s in self.of_trace(trace_id)})
        raise AssertionError(f"no {count} {name!r} span(s) in trace {trace_id} after {timeout} s; it has {names}")

    def span(self, span_id: str) -> ReceivedSpan | None:
        return next((s for s in self.spans if s.span_id == span_id), None)


def children(spans: list[ReceivedSpan], parent: ReceivedSpan) -> list[ReceivedSpan]:
    return sorted((s for s in spans if s.parent_id == parent.span_id), key=lambda s: s.start_ns)


def tree(spans: list[ReceivedSpan], root: ReceivedSpan) -> Any:
    """(name, [children's trees]) of `root`: the shape a test compares."""
    return (root.name, [tree(spans, child) for child in children(spans, root)])


def render(spans: list[ReceivedSpan], root: ReceivedSpan, shown: tuple[str, ...] = ()) -> str:
    """The tree as text, one span a line: its name, service and kind, duration and the attributes `shown`."""
    lines: list[str] = []

    def walk(span: ReceivedSpan, prefix: str, last: bool, top: bool) -> None:
        attributes = "  ".join(f"{k}={span.attributes[k]}" for k in shown if k in span.attributes)
        links = f"  links: {len(span.links)}" if span.links else ""
        branch = "" if top else ("└─ " if last else "├─ ")
        lines.append(
            f"{prefix}{branch}{span.name}  [{span.service}, {span.kind}]  {span.ms:.1f} ms"
            + (f"  {attributes}" if attributes else "")
            + links
        )
        kids = children(spans, span)
        for i, child in enumerate(kids):
            walk(child, prefix if top else prefix + ("   " if last else "│  "), i == len(kids) - 1, False)

    walk(root, "", True, True)
    return "\n".join(lines)
