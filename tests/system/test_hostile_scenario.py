"""Issue 11's hostile scenario against the real process, with default limits: 48 slow uploads of
24 MiB each (1 MiB every 250 ms, started again when they end) and, at the same time, a stream of
200 large overlay requests whose caller reads nothing for 25 s. The server's memory stays within a
stated bound, a health check and a small Segment on another channel are answered within 10 s
throughout, and the server ends SERVING with nothing left held and no traceback.

The figures it prints are in docs/operations.md."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from protos.segserve.v1 import segserve_pb2 as pb
from protos.segserve.v1 import segserve_pb2_grpc as pb_grpc
from tests.helpers.images import encode, photo_like
from tests.helpers.processes import ROOT, free_port, rss_of, wait_for_status

MiB = 1024 * 1024
UPLOADERS = 48
UPLOAD_CHUNKS = 24
CHUNK_EVERY_S = 0.25
STREAM_REQUESTS = 200
NOT_READING_S = 25.0
READING_S = 5.0
ANSWER_WITHIN_S = 10.0
PROBE_EVERY_S = 0.5
# Issue 21's bound (issue 11's was 600 MiB, which runs on a fast host passed two times in three); the figures
# of five runs are in docs/operations.md. Before issue 11's fixes it grew without end (5.9 GiB after 25 s).
RSS_GROWTH_BOUND = 400 * MiB
# Counted as answers: the server said no at once, rather than not answering.
ANSWERS = {grpc.StatusCode.OK, grpc.StatusCode.RESOURCE_EXHAUSTED}

PHOTO = encode(photo_like(2400, 1800), "JPEG", quality=90)
SMALL = encode(photo_like(160, 120), "JPEG")


def gauge(metrics_port: int, name: str) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10) as response:
        text = response.read().decode()
    return sum(s.value for f in text_string_to_metric_families(text) for s in f.samples if s.name == name)


def upload_chunks(stop: threading.Event, pause_s: float = CHUNK_EVERY_S) -> Iterator[pb.ImageChunk]:
    """A real photo padded to 24 MiB (JPEG ignores what follows its end), one MiB every 250 ms."""
    padding = os.urandom(MiB)
    yield pb.ImageChunk(id="slow", data=PHOTO + padding[len(PHOTO) :])
    for _ in range(UPLOAD_CHUNKS - 1):
        if stop.wait(pause_s):
            return
        yield pb.ImageChunk(data=padding)


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_slow_uploads_and_a_stream_that_does_not_read_leave_memory_bounded_and_the_server_answering(
    tmp_path: Path,
) -> None:
    metrics_port, port = free_port(), free_port()
    target = f"127.0.0.1:{port}"
    log_path = tmp_path / "server.log"
    with log_path.open("w") as log_file:
        process = subprocess.Popen(
            [sys.executable, "-m", "server", "--host", "127.0.0.1", "--port", str(port), "--device", "cpu",
             "--weights", "random", "--max-size", "256", "--metrics-port", str(metrics_port)],
            cwd=ROOT,
            env=os.environ.copy(),  # PYTHONPATH included: the server is this tree's
            stdout=log_file,
            stderr=subprocess.STDOUT,
        )  # fmt: skip
    stop = threading.Event()
    lock = threading.Lock()
    uploads: Counter[str] = Counter()
    probes: list[tuple[str, float, grpc.StatusCode]] = []
    rss_samples: list[int] = []
    stream_read = 0
    stream_end = ""
    threads: list[threading.Thread] = []
    try:
        wait_for_status(target, health_pb2.HealthCheckResponse.SERVING, timeout=120)
        # "Idle" is warm and at rest: the model has run at the scenario's shapes and batch sizes, and
        # an upload and an overlay stream have been served once, by a well-behaved caller.
        with grpc.insecure_channel(target) as channel:
            stub = pb_grpc.SegmenterStub(channel)
            stub.Segment(pb.SegmentRequest(image=SMALL), timeout=60)
            stub.SegmentUpload(upload_chunks(threading.Event(), pause_s=0), timeout=60)
            warm = [pb.SegmentRequest(image=PHOTO, options=pb.SegmentOptions(overlay=True))] * 8
            assert len(list(stub.SegmentStream(iter(warm), timeout=120))) == len(warm)
        time.sleep(1)
        idle_rss = rss_of(process.pid)

        def sample_rss() -> None:
            while not stop.wait(0.1):
                rss_samples.append(rss_of(process.pid))

        def probe() -> None:
            with grpc.insecure_channel(target) as channel:
                health = health_pb2_grpc.HealthStub(channel)
                segmenter = pb_grpc.SegmenterStub(channel)
                while not stop.wait(PROBE_EVERY_S):
                    for name, call in (
                        ("health", lambda: health.Check(health_pb2.HealthCheckRequest(), timeout=ANSWER_WITHIN_S)),
                        ("segment", lambda: segmenter.Segment(pb.SegmentRequest(image=SMALL), timeout=ANSWER_WITHIN_S)),
                    ):
                        started = time.monotonic()
                        try:
                            call()
                            code = grpc.StatusCode.OK
                        except grpc.RpcError as exc:
                            code = exc.code()
                        with lock:
                            probes.append((name, time.monotonic() - started, code))

        def upload(channel: grpc.Channel) -> None:
            stub = pb_grpc.SegmenterStub(channel)
            while not stop.is_set():
                try:
                    stub.SegmentUpload(upload_chunks(stop), timeout=60)
                    code = "OK"
                except grpc.RpcError as exc:
                    code = exc.code().name
                with lock:
                    uploads[code] += 1
                stop.wait(CHUNK_EVERY_S)  # a refused caller comes back, at its own pace

        def stream(channel: grpc.Channel) -> None:
            nonlocal stream_read, stream_end
            requests = (
                pb.SegmentRequest(id=str(i), image=PHOTO, options=pb.SegmentOptions(overlay=True))
                for i in range(STREAM_REQUESTS)
            )
            responses = pb_grpc.SegmenterStub(channel).SegmentStream(requests, timeout=120)
            time.sleep(NOT_READING_S)
            reading_until = time.monotonic() + READING_S
            try:
                for response in responses:
                    assert response.overlay_png or response.HasField("error")
                    stream_read += 1
                    if time.monotonic() > reading_until:
                        break
                responses.cancel()
                stream_end = "cancelled after reading"
            except grpc.RpcError as exc:
                stream_end = exc.code().name

        upload_channels = [grpc.insecure_channel(target) for _ in range(4)]
        stream_channel = grpc.insecure_channel(target)
        threads = [threading.Thread(target=sample_rss), threading.Thread(target=probe)]
        threads += [threading.Thread(target=upload, args=(upload_channels[i % 4],)) for i in range(UPLOADERS)]
        streamer = threading.Thread(target=stream, args=(stream_channel,))
        for thread in [*threads, streamer]:
            thread.start()
        streamer.join(NOT_READING_S + READING_S + 30)
        stop.set()
        for thread in threads:
            thread.join(60)
        for ch in [*upload_channels, stream_channel]:
            ch.close()
        assert wait_for_status(target, health_pb2.HealthCheckResponse.SERVING, timeout=10)
        held = {
            name: gauge(metrics_port, name)
            for name in (
                "segserve_upload_bytes_in_flight",
                "segserve_queue_depth",
                "segserve_streams_open",
                "segserve_stream_responses_unsent",
            )
        }
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=60)
    finally:
        stop.set()
        if process.poll() is None:
            process.kill()
    output = log_path.read_text()

    peak = max(rss_samples)
    slowest = {name: max(t for n, t, _ in probes if n == name) for name in ("health", "segment")}
    codes = Counter(f"{n}:{c.name}" for n, _, c in probes)
    print(
        f"\nRSS idle {idle_rss / MiB:.0f} MiB, peak {peak / MiB:.0f} MiB (+{(peak - idle_rss) / MiB:.0f} MiB); "
        f"slowest health {slowest['health'] * 1000:.0f} ms, slowest segment {slowest['segment'] * 1000:.0f} ms; "
        f"probes {dict(codes)}; uploads {dict(uploads)}; stream read {stream_read} ({stream_end})"
    )
    assert not [p for p in probes if p[2] not in ANSWERS or p[1] > ANSWER_WITHIN_S], probes
    assert min(codes[f"{name}:OK"] for name in ("health", "segment")) >= 8, "too few probes to say 'throughout'"
    assert peak - idle_rss < RSS_GROWTH_BOUND, f"RSS grew {(peak - idle_rss) / MiB:.0f} MiB"
    assert uploads["RESOURCE_EXHAUSTED"] > 0, "the upload budget was never reached: the scenario proves nothing"
    assert set(uploads) <= {"OK", "RESOURCE_EXHAUSTED"}, uploads
    assert stream_read > 0 and stream_end == "cancelled after reading", (stream_read, stream_end)
    assert held == dict.fromkeys(held, 0.0), held
    assert process.returncode == 0 and "Traceback" not in output, output[-3000:]
