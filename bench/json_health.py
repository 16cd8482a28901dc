"""gRPC health while big JSON bodies are parsed (issue 40): `python -m bench.json_health --grpc HOST:PORT
--http HOST:PORT --model NAME` prints one JSON object.

Four `POST /v2/models/{model}/infer` bodies of one RGB image as a JSON `PIXELS` tensor (about 8 MB each, as
tests/rest/test_slow_callers.py sends) go at once, each from its own thread, while one gRPC channel connected
beforehand asks grpc.health.v1 Check every 20 ms; each answer's wait is kept while any body is in flight (sent,
parsed, inferred, answered). The same polling for one second before the bodies gives the idle wait beside it.
docs/operations.md says why health should stay answered: the server parses such bodies on a worker thread,
and what is left is `json.loads` holding the GIL for one body's parse.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import threading
import time
import urllib.error
import urllib.request
from typing import Any

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc

BODIES = 4
SIDE = 860
"""An 860 x 860 RGB image of random values is a JSON body of about 8 MB, under the default 8 MiB message limit."""
INTERVAL_S = 0.02
IDLE_S = 1.0


def pixels_json(side: int) -> bytes:
    """A ModelInfer body of one side x side RGB image as a JSON PIXELS tensor (tests/rest/test_slow_callers.py
    sends the same)."""
    pixels = np.random.default_rng(0).integers(0, 256, size=side * side * 3).tolist()
    request = {"inputs": [{"name": "PIXELS", "datatype": "UINT8", "shape": [1, side, side, 3], "data": pixels}]}
    return json.dumps(request, separators=(",", ":")).encode()


def _poll(health: Any, until: Any, waits: list[float]) -> None:
    """Health checks every INTERVAL_S (from one check's start to the next) while `until()` is true."""
    while until():
        started = time.monotonic()
        health.Check(health_pb2.HealthCheckRequest(), timeout=30)
        waits.append(time.monotonic() - started)
        time.sleep(max(0.0, started + INTERVAL_S - time.monotonic()))


def _ms(waits: list[float]) -> dict[str, float | None]:
    return {
        "median_ms": statistics.median(waits) * 1000 if waits else None,
        "max_ms": max(waits) * 1000 if waits else None,
    }


def measure(grpc_target: str, http_target: str, model: str, bodies: int = BODIES, side: int = SIDE) -> dict[str, Any]:
    """Health's waits while `bodies` JSON bodies are in flight at once, and idle before them."""
    body = pixels_json(side)
    url = f"http://{http_target}/v2/models/{model}/infer"
    statuses: list[int] = []
    finished: list[float] = []

    def post() -> None:
        request = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=300) as response:
                response.read()
                statuses.append(response.status)
        except urllib.error.HTTPError as error:
            statuses.append(error.code)
        finished.append(time.monotonic())

    with grpc.insecure_channel(grpc_target) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        health.Check(health_pb2.HealthCheckRequest(), timeout=30)  # connected before anything is timed
        idle: list[float] = []
        idle_until = time.monotonic() + IDLE_S
        _poll(health, lambda: time.monotonic() < idle_until, idle)
        senders = [threading.Thread(target=post) for _ in range(bodies)]
        sent = time.monotonic()
        for sender in senders:
            sender.start()
        busy: list[float] = []
        _poll(health, lambda: any(sender.is_alive() for sender in senders), busy)
        for sender in senders:
            sender.join()
    return {
        "bodies": bodies,
        "body_bytes": len(body),
        "statuses": sorted(statuses),
        "bodies_s": max(finished, default=sent) - sent,
        "interval_ms": INTERVAL_S * 1000,
        "checks": len(busy),
        **_ms(busy),
        "idle": {"checks": len(idle), **_ms(idle)},
    }


def report_lines(health: dict[str, Any] | None) -> list[str]:
    """The generated section's part for a `measure` result (the batching-on server's `json_health`)."""
    if not health:
        return []
    idle = health["idle"]
    answers = ", ".join(f"{status} x{health['statuses'].count(status)}" for status in sorted(set(health["statuses"])))

    def ms(value: float | None) -> str:
        return "n/a" if value is None else f"{value:.0f} ms"

    return [
        "",
        "### gRPC health while big JSON bodies are parsed (the batching-on server, after its sweeps)",
        "",
        f"{health['bodies']} ModelInfer bodies of {health['body_bytes'] / 1e6:.1f} MB at once (one RGB image as a "
        f"JSON PIXELS tensor each, over HTTP), answered {answers or 'not at all'} within {health['bodies_s']:.1f} s; "
        f"meanwhile a gRPC health Check every {health['interval_ms']:.0f} ms on a connected channel: "
        f"{health['checks']} answers, median **{ms(health['median_ms'])}**, worst **{ms(health['max_ms'])}** "
        f"(idle just before: median {ms(idle['median_ms'])}, worst {ms(idle['max_ms'])}). "
        "tests/rest/test_slow_callers.py holds the worst under 150 ms (from 2026-12-05 bodies of 256 KiB and more "
        "parse in the JSON worker's child process, docs/operations.md).",
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.json_health", description=__doc__.splitlines()[0])
    parser.add_argument("--grpc", required=True, help="the server's gRPC HOST:PORT")
    parser.add_argument("--http", required=True, help="the server's HTTP HOST:PORT")
    parser.add_argument("--model", required=True)
    parser.add_argument("--bodies", type=int, default=BODIES)
    parser.add_argument("--side", type=int, default=SIDE, help="image side; 860 makes a body of about 8 MB")
    args = parser.parse_args(argv)
    sys.stdout.write(json.dumps(measure(args.grpc, args.http, args.model, args.bodies, args.side)) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
