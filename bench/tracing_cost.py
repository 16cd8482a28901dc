"""What tracing costs (issue 42): the off path timed alone, the settings of the traced server, and the ratios.

`python -m bench.tracing_cost [--number N] [--repeat R]` prints one JSON object: what tracing off (the default,
no SDK configured) adds to one Segment call, in microseconds, timed in this process with timeit (best of R
runs of N calls, per call):
- `client_us`: the client's `trace_metadata()`, the W3C injection every call makes, with no current span;
- `server_us`: the server's span sites on a Segment call's path with no SDK, as built when tracing is off:
  the interceptor's call span and the pipeline's "decode and resize" and "postprocess" spans, each a
  `nullcontext` entered and left (the overlay's span opens only when an overlay is asked, which the bench's
  calls do not; the `is None` tests in the pipeline and the batcher are single comparisons, left out).

bench.run serves the same sweep with tracing on (`server_env`: every span exported over OTLP/gRPC to a receiver in
the bench's process) and `summary` sets it against the default sweep: throughput at concurrency 8 and p50 at 1,
on / off, and the off path's share of the default sweep's p50 at concurrency 1.
"""

from __future__ import annotations

import argparse
import json
import sys
import timeit
from typing import Any

TRACED_CONCURRENCY = "1,8"
"""The traced server's steps: the single caller (latency) and the runtime target's concurrency (throughput)."""


def server_env(endpoint: str) -> dict[str, str]:
    """The traced server's OTEL_ variables: OTLP over gRPC to `endpoint`, every trace sampled (the costliest
    setting, so the ratio bounds what any sampler costs)."""
    return {
        "OTEL_EXPORTER_OTLP_ENDPOINT": endpoint,
        "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc",
        "OTEL_TRACES_SAMPLER": "always_on",
    }


def off_path_us(number: int, repeat: int) -> dict[str, float]:
    """Microseconds per call of the off path's two halves (module docstring), in a process with no SDK."""
    from client.tracing import trace_metadata
    from server.core.model_pipeline import _span, tracer_if_on
    from server.grpc.interceptor import ObservingInterceptor
    from server.operations.metrics import Metrics

    interceptor = ObservingInterceptor(Metrics())
    if interceptor.tracer is not None or tracer_if_on() is not None:
        raise RuntimeError("an OpenTelemetry SDK is configured in this process: the off path cannot be timed here")
    method = "/segserve.v1.Segmenter/Segment"
    context: Any = None  # never read when tracing is off

    def span_sites() -> None:
        with interceptor._span(method, context), _span(None, "decode and resize"):
            pass
        with _span(None, "postprocess"):
            pass

    def best_us(call: Any) -> float:
        return min(timeit.repeat(call, number=number, repeat=repeat)) / number * 1e6

    return {"client_us": best_us(trace_metadata), "server_us": best_us(span_sites), "number": number, "repeat": repeat}


def _step(steps: list[dict[str, Any]], concurrency: int) -> dict[str, Any] | None:
    return next((s for s in steps if s["concurrency"] == concurrency), None)


def summary(result: dict[str, Any]) -> dict[str, Any] | None:
    """The traced sweep against the default one, from a result's `served`, `served_tracing` and
    `tracing_off_path`; None when the result has no traced sweep. A figure not measured is None."""
    traced = result.get("served_tracing")
    if not traced:
        return None
    off_steps, on_steps = result["served"]["steps"], traced["steps"]
    off8, on8 = _step(off_steps, 8), _step(on_steps, 8)
    off1, on1 = _step(off_steps, 1), _step(on_steps, 1)
    off_path = result.get("tracing_off_path") or {}
    off_path_us = off_path["client_us"] + off_path["server_us"] if off_path else None
    return {
        "throughput_at_8": {"off": off8["throughput"] if off8 else None, "on": on8["throughput"] if on8 else None},
        "p50_ms_at_1": {"off": off1["p50_ms"] if off1 else None, "on": on1["p50_ms"] if on1 else None},
        "throughput_on_over_off_at_8": on8["throughput"] / off8["throughput"] if on8 and off8 else None,
        "p50_on_over_off_at_1": on1["p50_ms"] / off1["p50_ms"] if on1 and off1 else None,
        "off_path_us": off_path_us,
        "off_path_share_of_p50_at_1": off_path_us / (off1["p50_ms"] * 1000) if off_path_us and off1 else None,
        "spans": traced.get("spans"),
        "traced_calls": traced.get("traced_calls"),
    }


def _num(value: float | None, digits: int) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def report_lines(result: dict[str, Any]) -> list[str]:
    """The generated section's tracing part: the traced sweep beside the default one, and the off path's cost."""
    found = summary(result)
    if found is None:
        return []
    throughput, p50 = found["throughput_at_8"], found["p50_ms_at_1"]
    lines = [
        "",
        "### Tracing: on (every span exported over OTLP) against off (the default), same settings otherwise",
        "",
        "| Figure | Off | On | On / off |",
        "| --- | --- | --- | --- |",
        f"| Images/s at concurrency 8 | {_num(throughput['off'], 2)} | {_num(throughput['on'], 2)} | "
        f"{_num(found['throughput_on_over_off_at_8'], 2)} |",
        f"| p50 ms at concurrency 1 | {_num(p50['off'], 0)} | {_num(p50['on'], 0)} | "
        f"{_num(found['p50_on_over_off_at_1'], 2)} |",
    ]
    spans, calls = found["spans"], found["traced_calls"]
    if spans is not None and calls:
        exported = f"{spans} spans received for {calls} calls ({spans / calls:.1f} a call)"
    else:
        exported = f"{spans if spans is not None else 'n/a'} spans received"
    lines += [
        "",
        "Tracing on: OTEL_EXPORTER_OTLP_ENDPOINT to an OTLP/gRPC receiver in the bench's process, "
        f"OTEL_TRACES_SAMPLER=always_on, its own server run right after the default sweep; {exported}.",
    ]
    off_path = result.get("tracing_off_path")
    share = found["off_path_share_of_p50_at_1"]
    if off_path and share is not None:
        lines += [
            "",
            f"Tracing off adds {found['off_path_us']:.1f} us to a Segment call, timed alone (timeit, best of "
            f"{off_path['repeat']} x {off_path['number']:,}): the client's trace_metadata() with no current span "
            f"{off_path['client_us']:.2f} us, the server's span sites with no SDK {off_path['server_us']:.2f} us. "
            f"Beside the served p50 at concurrency 1 ({p50['off']:.0f} ms) that is **{share * 100:.2g}%**.",
        ]
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.tracing_cost", description=__doc__.splitlines()[0])
    parser.add_argument("--number", type=int, default=200_000, help="calls per timing")
    parser.add_argument("--repeat", type=int, default=5, help="timings; the best is kept")
    args = parser.parse_args(argv)
    sys.stdout.write(json.dumps(off_path_us(args.number, args.repeat)) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
