"""Where a stalled stream's memory goes (issue 21): the hostile scenario's stream alone, against a fresh
`python -m server` warmed as tests/system/test_hostile_scenario.py warms it.

`python -m bench.stalled_stream [--requests 200] [-- SERVER_ARGS...]` sends overlay requests for a
2400x1800 JPEG, reads nothing for 25 s, then reads for 5 s and cancels. It prints one JSON object: RSS
growth over warm idle, the requests the caller's iterator gave up against the server's unsent responses
every 5 s, and the server's own probes (bench.memory_probe) at rest and during the stall. Server settings
come from SEGSERVE_* in the environment or the arguments after `--` (SEGSERVE_HTTP2_WINDOW_BYTES=134217728
stands in for the window BDP probing grows to on a fast host).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc

from protos.segserve.v1 import segserve_pb2 as pb
from protos.segserve.v1 import segserve_pb2_grpc as pb_grpc

MiB = 1024 * 1024
ROOT = Path(__file__).resolve().parents[1]
NOT_READING_S = 25.0
READING_S = 5.0


def photo_like_jpeg(width: int, height: int) -> bytes:
    """The hostile scenario's photo (tests.helpers.images.photo_like, seed 0, JPEG quality 90): about 230 KB."""
    import io

    from PIL import Image

    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    channels = []
    for _ in range(3):
        fx, fy = (float(f) for f in rng.uniform(0.5, 4, 2))
        phase = float(rng.uniform(0, 6.28))
        channels.append(127 + 120 * np.sin(x / width * fx * 6.28 + phase) * np.cos(y / height * fy * 6.28))
    buffer = io.BytesIO()
    Image.fromarray(np.stack(channels, axis=-1).clip(0, 255).astype(np.uint8)).save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def rss_of(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_serving(target: str, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    with grpc.insecure_channel(target) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            try:
                if health.Check(health_pb2.HealthCheckRequest(), timeout=2).status == 1:
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.5)
    raise RuntimeError(f"{target} never SERVING")


def unsent(metrics_port: int) -> float:
    import urllib.request

    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10) as response:
        for line in response.read().decode().splitlines():
            if line.startswith("segserve_stream_responses_unsent "):
                return float(line.split()[1])
    return 0.0


def run(requests: int, server_args: list[str]) -> dict[str, Any]:
    photo = photo_like_jpeg(2400, 1800)
    port, metrics_port = free_port(), free_port()
    target = f"127.0.0.1:{port}"
    probes = Path(tempfile.mkdtemp()) / "probes.jsonl"
    args = ["--host", "127.0.0.1", "--port", str(port), "--metrics-port", str(metrics_port), "--http-port", "-1"]
    env = {**os.environ, "SEGSERVE_PROBE_PATH": str(probes)}
    process = subprocess.Popen(
        [sys.executable, "-m", "bench.memory_probe", *args, *server_args],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_serving(target)
        with grpc.insecure_channel(target) as channel:  # warm: the same overlays, read by a good caller
            warm = [pb.SegmentRequest(image=photo, options=pb.SegmentOptions(overlay=True))] * 8
            list(pb_grpc.SegmenterStub(channel).SegmentStream(iter(warm), timeout=300))
        time.sleep(1)
        process.send_signal(signal.SIGUSR1)  # at rest; starts tracing
        time.sleep(0.5)
        idle = rss_of(process.pid)
        peak = [idle]
        stop = threading.Event()

        def sample() -> None:
            while not stop.wait(0.1):
                peak[0] = max(peak[0], rss_of(process.pid))

        threading.Thread(target=sample, daemon=True).start()
        pulled = [0]

        def stream() -> Iterator[pb.SegmentRequest]:
            for i in range(requests):
                pulled[0] += 1
                yield pb.SegmentRequest(id=str(i), image=photo, options=pb.SegmentOptions(overlay=True))

        marks = []
        with grpc.insecure_channel(target) as channel:
            started = time.monotonic()
            responses = pb_grpc.SegmenterStub(channel).SegmentStream(stream(), timeout=300)
            for at in (5, 10, 15, 20, 24):
                time.sleep(max(0.0, started + at - time.monotonic()))
                marks.append({"s": at, "pulled": pulled[0], "unsent": unsent(metrics_port)})
            process.send_signal(signal.SIGUSR1)  # during the stall
            time.sleep(NOT_READING_S - 24)
            read, until = 0, time.monotonic() + READING_S
            for _ in responses:
                read += 1
                if time.monotonic() > until:
                    break
            responses.cancel()  # type: ignore[no-untyped-call]  # grpc's stubs leave it untyped
        stop.set()
        rest, stalled = (json.loads(line) for line in probes.read_text().splitlines()[:2])
        return {
            "idle_rss_mib": round(idle / MiB),
            "peak_growth_mib": round((peak[0] - idle) / MiB),
            "every_5_s": marks,
            "read_after_stall": read,
            "growth_during_stall_mib": {
                key: round((stalled[key] - rest[key]) / MiB, 1)
                for key in ("VmRSS", "malloc_in_use", "malloc_free_kept", "malloc_arenas")
            },
            "python_heap_traced_mib": round(stalled["python_traced"] / MiB, 1),
            "python_heap_peak_mib": round(stalled["python_traced_peak"] / MiB, 1),
            "python_top": stalled["python_top"][:4],
        }
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(60)
        except subprocess.TimeoutExpired:
            process.kill()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("server_args", nargs="*", help="after --: python -m server flags")
    options = parser.parse_args()
    defaults = ["--device", "cpu", "--weights", "random", "--max-size", "256"]
    print(json.dumps(run(options.requests, [*defaults, *options.server_args])))
    return 0


if __name__ == "__main__":
    sys.exit(main())
