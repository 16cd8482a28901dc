"""A bounded soak: minutes of mixed good and bad load from several threads against the real process.
No good request may fail, and the server's memory may not grow past a stated bound once warm.

SEGSERVE_SOAK_SECONDS sets the length (default 90; CI uses the default); `-m "not soak"` skips it."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections import Counter
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from client import SegmentClient, SegmentError
from tests.helpers.images import animated_gif, cmyk_jpeg, encode, photo_like, png16, png_declaring
from tests.helpers.processes import ROOT, free_port, rss_of, wait_for_status

SOAK_SECONDS = float(os.environ.get("SEGSERVE_SOAK_SECONDS", "90"))
THREADS = 3
WARM_FRACTION = 0.25
# Measured: see docs/operations.md (RSS growth after warm-up over a 90 s soak). Bound with headroom.
RSS_GROWTH_BOUND = 64 * 1024 * 1024


def counters(metrics_port: int) -> dict[tuple[str, str], float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10) as response:
        text = response.read().decode()
    return {
        (sample.labels["method"], sample.labels["code"]): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == "segserve_requests_total"
    }


GOOD = [
    encode(photo_like(160, 120, seed=1), "JPEG"),
    encode(photo_like(120, 160, seed=2)),
    encode(photo_like(200, 90, seed=3), "WEBP"),
    encode(Image.new("RGB", (1, 1))),
    cmyk_jpeg(),
    png16(),
    animated_gif(),
    encode(photo_like(900, 700, seed=4), "PNG"),  # over the upload threshold below: goes through SegmentUpload
]
BAD = [
    (b"", grpc.StatusCode.INVALID_ARGUMENT),
    (os.urandom(3000), grpc.StatusCode.INVALID_ARGUMENT),
    (GOOD[0][: len(GOOD[0]) // 2], grpc.StatusCode.INVALID_ARGUMENT),
    (png_declaring(30000, 30000), grpc.StatusCode.RESOURCE_EXHAUSTED),
]
UPLOAD_THRESHOLD = 200_000


@pytest.mark.soak
@pytest.mark.slow
@pytest.mark.timeout(SOAK_SECONDS + 240)
def test_soak_mixed_load_no_failed_good_request_and_bounded_memory(tmp_path: Path) -> None:
    metrics_port, port = free_port(), free_port()
    target = f"127.0.0.1:{port}"
    # The log goes to a file: thousands of access lines would fill a pipe nobody reads and stall the server.
    log_path = tmp_path / "server.log"
    log_file = log_path.open("w")
    process = subprocess.Popen(
        [sys.executable, "-m", "server", "--host", "127.0.0.1", "--port", str(port), "--device", "cpu",
         "--weights", "random", "--max-size", "64", "--metrics-port", str(metrics_port), "--max-image-bytes", "4000000"],
        cwd=ROOT,
        stdout=log_file,
        stderr=subprocess.STDOUT,
    )  # fmt: skip
    failures: list[str] = []
    latencies: list[float] = []
    calls: Counter[tuple[str, str]] = Counter()
    lock = threading.Lock()
    stop = threading.Event()

    def record(method: str, code: grpc.StatusCode, elapsed: float | None = None) -> None:
        with lock:
            calls[(method, code.name)] += 1
            if elapsed is not None:
                latencies.append(elapsed)

    def worker(seed: int) -> None:
        rng = random.Random(seed)
        with SegmentClient(target, timeout=60, upload_threshold=UPLOAD_THRESHOLD) as client:
            while not stop.is_set():
                roll = rng.random()
                try:
                    if roll < 0.6:
                        image = rng.choice(GOOD)
                        method = "SegmentUpload" if len(image) > UPLOAD_THRESHOLD else "Segment"
                        started = time.monotonic()
                        result = client.segment(image, overlay=rng.random() < 0.3)
                        assert result.mask.shape == (result.height, result.width)
                        record(method, grpc.StatusCode.OK, time.monotonic() - started)
                    elif roll < 0.85:
                        data, expected = rng.choice(BAD)
                        try:
                            client.segment(data)
                            failures.append(f"bad input accepted: {data[:16]!r}")
                        except SegmentError as exc:
                            if exc.code != expected:
                                failures.append(f"bad input got {exc}")
                            record("Segment", exc.code)
                    else:
                        batch = [*rng.sample(GOOD[:7], 3), BAD[1][0]]
                        results = list(client.segment_many(batch))
                        bad = [r for r in results if r.error is not None]
                        if len(results) != 4 or [r.id for r in bad] != ["3"]:
                            failures.append(f"stream: {[(r.id, r.error) for r in results]}")
                        record("SegmentStream", grpc.StatusCode.OK)
                except Exception as exc:  # any failure of a good request fails the soak
                    failures.append(f"{type(exc).__name__}: {exc}")

    try:
        wait_for_status(target, health_pb2.HealthCheckResponse.SERVING, timeout=120)
        threads = [threading.Thread(target=worker, args=(seed,), daemon=True) for seed in range(THREADS)]
        for thread in threads:
            thread.start()
        time.sleep(SOAK_SECONDS * WARM_FRACTION)
        warm_rss = rss_of(process.pid)
        samples = [warm_rss]
        remaining = SOAK_SECONDS * (1 - WARM_FRACTION)
        while remaining > 0:
            time.sleep(min(5.0, remaining))
            remaining -= 5.0
            samples.append(rss_of(process.pid))
        stop.set()
        for thread in threads:
            thread.join(90)
        end_rss = rss_of(process.pid)
        seen = counters(metrics_port)
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=60)
    finally:
        stop.set()
        if process.poll() is None:
            process.kill()
        log_file.close()
    output = log_path.read_text()

    good = sum(n for (method, code), n in calls.items() if code == "OK")
    latencies.sort()
    p50, p99 = latencies[len(latencies) // 2], latencies[int(len(latencies) * 0.99)]
    growth = end_rss - warm_rss
    print(
        f"\nsoak {SOAK_SECONDS:.0f}s: {sum(calls.values())} calls ({good} good), p50 {p50 * 1000:.0f} ms, "
        f"p99 {p99 * 1000:.0f} ms; RSS warm {warm_rss / 2**20:.0f} MiB, end {end_rss / 2**20:.0f} MiB, "
        f"max {max(samples) / 2**20:.0f} MiB, growth {growth / 2**20:.1f} MiB"
    )
    assert not failures, failures[:10]
    assert good > 50, "the soak did too little to prove anything"
    assert growth < RSS_GROWTH_BOUND, f"RSS grew {growth / 2**20:.1f} MiB after warm-up"
    # The metrics endpoint counted exactly what the callers saw.
    for key, count in calls.items():
        assert seen.get(key, 0) == count, (key, seen.get(key), count)
    assert process.returncode == 0 and "Traceback" not in output
    access_lines = output.count("segserve.access")
    assert access_lines >= sum(calls.values()), "one log line per call"


def test_soak_marker_is_registered(pytestconfig: pytest.Config) -> None:
    assert any(line.startswith("soak:") for line in pytestconfig.getini("markers"))
