"""The caller's trace sent with each call, so that a server with tracing on continues it (W3C `traceparent`,
`tracestate` and `baggage` in the gRPC metadata), and the CLI's own span.

A program that uses the client library and has its own OpenTelemetry SDK set up gets its current span
continued by the server with nothing more to do: `trace_metadata` reads the current context. Without an SDK
(or outside any span) it adds nothing. The CLI sets up an SDK itself when the standard OTEL_ variables ask for
export, as the server does (OTEL_EXPORTER_OTLP_ENDPOINT alone turns it on; OTEL_SDK_DISABLED=true or
OTEL_TRACES_EXPORTER=none keep it off), and runs each command inside one span of kind CLIENT.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Mapping

from opentelemetry import propagate, trace

SERVICE = "segserve-client"
"""service.name of the CLI's spans unless OTEL_SERVICE_NAME (or OTEL_RESOURCE_ATTRIBUTES) says otherwise."""


def trace_metadata() -> tuple[tuple[str, str], ...]:
    """The current trace context as gRPC metadata (nothing when there is no current span)."""
    carrier: dict[str, str] = {}
    propagate.inject(carrier)
    return tuple(carrier.items())


def _export_wanted(environ: Mapping[str, str]) -> bool:
    if environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return False
    named = environ.get("OTEL_TRACES_EXPORTER", "").strip().lower()
    if named:
        return named == "otlp"
    return bool(environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or environ.get("OTEL_EXPORTER_OTLP_ENDPOINT"))


@contextlib.contextmanager
def command_span(command: str, environ: Mapping[str, str] | None = None) -> Iterator[None]:
    """Runs a CLI command inside its span ("python -m client COMMAND"), exported over OTLP before the command
    returns, when the environment asks for export; otherwise just runs it."""
    env = os.environ if environ is None else environ
    if not _export_wanted(env):
        yield
        return
    # Imported here: the SDK and an exporter are loaded only by a CLI run that exports.
    from opentelemetry.sdk.resources import SERVICE_NAME, Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter

    exporter: SpanExporter
    protocol = env.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL") or env.get("OTEL_EXPORTER_OTLP_PROTOCOL") or "grpc"
    if protocol.strip() == "http/protobuf":
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter as HttpExporter

        exporter = HttpExporter()
    else:
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter as GrpcExporter

        exporter = GrpcExporter()
    resource = Resource.create()
    if str(resource.attributes.get(SERVICE_NAME, "")).startswith("unknown_service"):
        resource = resource.merge(Resource({SERVICE_NAME: SERVICE}))
    provider = TracerProvider(resource=resource)
    provider.add_span_processor(BatchSpanProcessor(exporter))
    try:
        tracer = provider.get_tracer("segserve.client")
        with tracer.start_as_current_span(f"python -m client {command}", kind=trace.SpanKind.CLIENT):
            yield
    finally:
        provider.shutdown()  # the spans exported before the process ends
