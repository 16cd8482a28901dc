"""Traces: OpenTelemetry's SDK set up from the standard environment variables, and Triton's trace settings.

Off by default. Nothing here runs on a request when it is off: the doors and the core ask once, when they are
built, for a tracer (`tracer_if_on`), and hold None when no SDK is configured, so a call pays one `is None`.

What turns it on, as in any SDK-instrumented service:
- `OTEL_EXPORTER_OTLP_ENDPOINT` (or `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`) alone: spans are exported over OTLP;
- `OTEL_TRACES_EXPORTER=otlp` (to the exporter's default endpoint) or `console` (spans printed to stdout);
and what keeps it off whatever else is set: `OTEL_SDK_DISABLED=true` or `OTEL_TRACES_EXPORTER=none`.
The one difference from the SDK's own auto-configuration (opentelemetry-instrument): without an endpoint and
without `OTEL_TRACES_EXPORTER`, it stays off, since a server that exports to localhost:4317 unasked logs an
export error every few seconds where no collector runs.
`OTEL_EXPORTER_OTLP_PROTOCOL` (or `..._TRACES_PROTOCOL`): `grpc` (the default of Python's SDK) or
`http/protobuf`. The exporter, the batch span processor, the sampler (`OTEL_TRACES_SAMPLER`, `..._ARG`), the
resource (`OTEL_SERVICE_NAME`, `OTEL_RESOURCE_ATTRIBUTES`; service.name defaults to "segserve") and the
propagators (`OTEL_PROPAGATORS`, W3C trace context and baggage by default) read the rest of their settings
from the environment themselves.

Triton's trace extension (`/v2/trace/setting`, gRPC TraceSetting) is mapped onto this by `trace_settings`:
trace_level OFF or TIMESTAMPS switches sampling off or back on, trace_rate N samples one trace in N (by trace
id, a caller's sampled parent always followed); what has no meaning here is refused, each with its reason.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import grpc
from opentelemetry import propagate, trace
from opentelemetry.context import Context
from opentelemetry.sdk.resources import SERVICE_NAME, Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter, SpanExporter
from opentelemetry.sdk.trace.sampling import (
    ALWAYS_OFF,
    ParentBased,
    Sampler,
    SamplingResult,
    TraceIdRatioBased,
    _get_from_env_or_default,
)
from opentelemetry.trace import Link, SpanKind
from opentelemetry.util.types import Attributes

from server.errors import InvalidRequest, NotServed, SegservError

log = logging.getLogger(__name__)

SERVICE = "segserve"
"""service.name when neither OTEL_SERVICE_NAME nor OTEL_RESOURCE_ATTRIBUTES names one."""
PROTOCOLS = ("grpc", "http/protobuf")


class TracingSettingsError(ValueError):
    """An OTEL_ variable that cannot be served as set (the server refuses to start, naming it)."""


# ---- which exporter the environment asks for ------------------------------------------------------------


def exporter_wanted(environ: Mapping[str, str]) -> str | None:
    """ "otlp", "console" or None (tracing off), from the environment as described in the module's docstring."""
    if environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return None
    named = [n.strip().lower() for n in environ.get("OTEL_TRACES_EXPORTER", "").split(",") if n.strip()]
    if not named:
        endpoint = environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or environ.get("OTEL_EXPORTER_OTLP_ENDPOINT")
        return "otlp" if endpoint else None
    if named == ["none"]:
        return None
    if len(named) > 1 or named[0] not in ("otlp", "console"):
        raise TracingSettingsError(
            f"OTEL_TRACES_EXPORTER={environ['OTEL_TRACES_EXPORTER']!r}: segserve exports to one of otlp, "
            "console or none"
        )
    return named[0]


def _protocol(environ: Mapping[str, str]) -> str:
    protocol = (
        environ.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL") or environ.get("OTEL_EXPORTER_OTLP_PROTOCOL") or "grpc"
    ).strip()
    if protocol not in PROTOCOLS:
        raise TracingSettingsError(
            f"OTEL_EXPORTER_OTLP_PROTOCOL={protocol!r}: segserve sends OTLP as grpc or http/protobuf "
            "(http/json is not in the Python SDK)"
        )
    return protocol


def _exporter(kind: str, environ: Mapping[str, str]) -> SpanExporter:
    if kind == "console":
        return ConsoleSpanExporter()
    # Imported here: each exporter pulls in its transport, which a server without tracing never needs.
    if _protocol(environ) == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter as GrpcExporter

        return GrpcExporter()
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter as HttpExporter

    return HttpExporter()


def _resource() -> Resource:
    resource = Resource.create()
    if str(resource.attributes.get(SERVICE_NAME, "")).startswith("unknown_service"):
        resource = resource.merge(Resource({SERVICE_NAME: SERVICE}))
    return resource


# ---- the sampler Triton's trace settings change ---------------------------------------------------------


class SettableSampler(Sampler):
    """The configured sampler (OTEL_TRACES_SAMPLER), which the trace settings can replace while serving."""

    def __init__(self, configured: Sampler) -> None:
        self.configured = configured
        self.current = configured

    def should_sample(
        self,
        parent_context: Context | None,
        trace_id: int,
        name: str,
        kind: SpanKind | None = None,
        attributes: Attributes = None,
        links: Sequence[Link] | None = None,
        trace_state: trace.TraceState | None = None,
    ) -> SamplingResult:
        return self.current.should_sample(parent_context, trace_id, name, kind, attributes, links, trace_state)

    def get_description(self) -> str:
        return f"SettableSampler{{{self.current.get_description()}}}"


@dataclass
class _Tracing:
    provider: TracerProvider
    sampler: SettableSampler
    level: str = "TIMESTAMPS"
    rate: int = 1


_tracing: _Tracing | None = None


def _configured_rate(sampler: Sampler) -> int:
    """trace_rate as Triton would say it: one in N; 1 unless the configured sampler samples by ratio."""
    ratio = getattr(sampler, "rate", None)
    root = getattr(sampler, "_root", None)
    if ratio is None and root is not None:
        ratio = getattr(root, "rate", None)
    if isinstance(ratio, float) and 0 < ratio < 1:
        return max(1, round(1 / ratio))
    return 1


def configure(environ: Mapping[str, str] | None = None) -> bool:
    """Sets the global tracer provider as the OTEL_ environment asks; returns whether tracing is on. Call once,
    before the server is built (the doors and models ask for their tracer then). Raises TracingSettingsError."""
    global _tracing
    env = os.environ if environ is None else environ
    kind = exporter_wanted(env)
    if kind is None:
        return False
    exporter = _exporter(kind, env)
    sampler = SettableSampler(_get_from_env_or_default())
    provider = TracerProvider(sampler=sampler, resource=_resource())
    provider.add_span_processor(BatchSpanProcessor(exporter))
    trace.set_tracer_provider(provider)
    _tracing = _Tracing(provider, sampler, rate=_configured_rate(sampler.configured))
    log.info(
        "tracing on: %s spans (%s) of %s, sampler %s",
        kind,
        _protocol(env) if kind == "otlp" else "stdout",
        provider.resource.attributes.get(SERVICE_NAME),
        sampler.configured.get_description(),
    )
    return True


def shutdown() -> None:
    """Exports the spans still buffered and stops the exporter (at the server's stop)."""
    global _tracing
    if _tracing is not None:
        _tracing.provider.shutdown()
        _tracing = None


def tracer_if_on(name: str) -> trace.Tracer | None:
    """A tracer when an SDK provider is set (by `configure`, or by a program that embeds the server), else
    None: the API's no-op tracer still costs a context switch per span, None costs nothing."""
    provider = trace.get_tracer_provider()
    if isinstance(provider, trace.ProxyTracerProvider | trace.NoOpTracerProvider):
        return None
    return provider.get_tracer(name)


def extract(carrier: Mapping[str, str]) -> Context:
    """The caller's trace context (W3C traceparent, tracestate, baggage: OTEL_PROPAGATORS) from its headers."""
    return propagate.extract(carrier)


# ---- Triton's trace setting extension ---------------------------------------------------------------------

_NO_TRACE_FILE = "segserve exports spans over OTLP as they end (OTEL_EXPORTER_OTLP_ENDPOINT); it writes no trace file"
_REFUSED = {
    "trace_file": _NO_TRACE_FILE,
    "log_frequency": _NO_TRACE_FILE,
    "trace_count": "segserve samples by rate (trace_rate) and never stops after a count; only -1 is taken",
}


def trace_settings(update: Mapping[str, Sequence[str]] | None = None, model: str = "") -> dict[str, list[str]]:
    """Triton's trace settings: applies `update` (a setting with no values goes back to its value at start-up),
    then answers every setting. Raises InvalidRequest for a value it cannot take, NotServed for what segserve
    has no equivalent of, FAILED_PRECONDITION for turning tracing on in a server started without an exporter."""
    if model:
        raise NotServed(
            f"trace settings of one model ({model[:64]!r}) are not supported: segserve samples for the whole "
            "server; change the server's trace settings instead"
        )
    for key, values in (update or {}).items():
        _apply(key, list(values))
    state = _tracing
    return {
        "trace_level": [state.level if state else "OFF"],
        "trace_rate": [str(state.rate if state else 1)],
        "trace_count": ["-1"],
        "log_frequency": ["0"],
        "trace_mode": ["opentelemetry"],
    }


def _apply(key: str, values: list[str]) -> None:
    state = _tracing
    if key == "trace_mode":
        if values and values != ["opentelemetry"]:
            raise NotServed(f"trace_mode {values}: segserve traces with OpenTelemetry only (trace_mode opentelemetry)")
        return
    if key in _REFUSED:
        if key == "trace_count" and values in ([], ["-1"]):
            return
        if key == "log_frequency" and values in ([], ["0"]):
            return
        raise NotServed(f"{key} is not supported: {_REFUSED[key]}")
    if key == "trace_level":
        level = _level(values)
        if state is None:
            if level == "OFF":
                return
            raise SegservError(
                "tracing is off in this server: start it with OTEL_EXPORTER_OTLP_ENDPOINT (or OTEL_TRACES_EXPORTER) "
                "set to export spans",
                grpc.StatusCode.FAILED_PRECONDITION,
            )
        state.level = level
    elif key == "trace_rate":
        rate = _rate(values)
        if state is None:
            if rate == 1:
                return
            raise SegservError(
                "tracing is off in this server; trace_rate has nothing to sample", grpc.StatusCode.FAILED_PRECONDITION
            )
        state.rate = rate if rate else _configured_rate(state.sampler.configured)
    else:
        raise InvalidRequest(
            f"unknown trace setting {key[:64]!r}: segserve takes trace_level, trace_rate, trace_count, "
            "log_frequency, trace_file and trace_mode"
        )
    _resample(state)


def _level(values: list[str]) -> str:
    if not values:
        return "TIMESTAMPS"  # the value at start-up, when tracing is configured
    upper = sorted({v.strip().upper() for v in values})
    if upper == ["OFF"]:
        return "OFF"
    if "TENSORS" in upper:
        raise NotServed("trace_level TENSORS is not supported: segserve's spans hold times and sizes, never tensors")
    if upper == ["TIMESTAMPS"]:
        return "TIMESTAMPS"
    raise InvalidRequest(f"trace_level {values}: OFF or TIMESTAMPS")


def _rate(values: list[str]) -> int:
    """One in N; 0 stands for 'back to the configured sampler'."""
    if not values:
        return 0
    if len(values) != 1 or not values[0].strip().isdigit() or int(values[0]) < 1:
        raise InvalidRequest(f"trace_rate {values}: one whole number, at least 1 (one trace in N)")
    return int(values[0])


def _resample(state: _Tracing | None) -> None:
    if state is None:
        return
    sampler = state.sampler
    if state.level == "OFF":
        sampler.current = ALWAYS_OFF
    elif state.rate == _configured_rate(sampler.configured):
        sampler.current = sampler.configured
    else:
        sampler.current = ParentBased(TraceIdRatioBased(1 / state.rate))
