"""Triton's perf_analyzer (the binary in tritonclient's x86_64 wheel) drives segserve over gRPC and HTTP."""

from __future__ import annotations

import csv
import subprocess
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from bench import perf_analyzer
from client import SegmentClient
from server.core.types import ResolvedOptions
from tests.helpers.images import encode
from tests.helpers.known_model import MODEL_NAME, Shape, render_scene
from tests.helpers.servers import ServerThread

PERF_ANALYZER = perf_analyzer.binary()
SERVER_STAGES = ("Queue", "Compute Input", "Compute Infer", "Compute Output")
"""perf_analyzer's CSV columns for the server's side, "Server Queue" and so on."""


def input_data_image() -> bytes:
    return encode(Image.fromarray(render_scene(200, 150, [Shape("red", "disc", 0.4, 0.4, 0.25)])[0]))


def input_data(path: Path) -> Path:
    return perf_analyzer.write_input_data([input_data_image()], path)


@pytest.mark.slow
@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_perf_analyzer_reports_throughput_and_latency(
    known_server: ServerThread, tmp_path: Path, protocol: str
) -> None:
    assert PERF_ANALYZER, "perf_analyzer comes with tritonclient's x86_64 wheel (the dev extra)"
    port = known_server.port if protocol == "grpc" else known_server.app.http_port
    report = tmp_path / "report.csv"
    done = subprocess.run(
        [PERF_ANALYZER, "-m", MODEL_NAME, "-i", protocol, "-u", f"127.0.0.1:{port}",
         "--input-data", str(input_data(tmp_path / "input.json")), "--concurrency-range", "1:2",
         "--measurement-interval", "1000", "--stability-percentage", "100", "-f", str(report)],
        env=perf_analyzer.environment(),
        capture_output=True, text=True, timeout=240, check=False,
    )  # fmt: skip
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    rows = list(csv.DictReader(report.open()))
    assert sorted(row["Concurrency"] for row in rows) == ["1", "2"]
    for row in rows:
        assert float(row["Inferences/Second"]) > 0 and int(row["p99 latency"]) > 0
        # The server's side, a request's mean in microseconds from ModelStatistics: each compute stage took time,
        # and all the stages together fit in the client's p99 latency.
        server_us = {stage: int(row[f"Server {stage}"]) for stage in SERVER_STAGES}
        assert min(server_us["Compute Input"], server_us["Compute Infer"], server_us["Compute Output"]) > 0, row
        assert sum(server_us.values()) <= int(row["p99 latency"]), row
    # Two requests at a time on one model instance: one waits while the other is in the model.
    (two,) = [row for row in rows if row["Concurrency"] == "2"]
    assert int(two["Server Queue"]) > 0, two
    assert "Server:" in done.stdout and "compute infer" in done.stdout


@pytest.mark.slow
def test_the_bench_sweep_reads_perf_analyzers_report(known_server: ServerThread, tmp_path: Path) -> None:
    """What `make bench` runs: one step per concurrency, in the bench's units."""
    rows = perf_analyzer.run(
        MODEL_NAME, f"127.0.0.1:{known_server.port}", "grpc", input_data(tmp_path / "input.json"), [1, 2],
        window_ms=1000, report=tmp_path / "pa.csv", stability_percentage=100, max_trials=3,
    )  # fmt: skip
    assert [(r["protocol"], r["concurrency"]) for r in rows] == [("grpc", 1), ("grpc", 2)]
    for row in rows:
        assert row["throughput"] > 0 and 0 < row["p50_ms"] <= row["p99_ms"] < 60_000
        # From ModelStatistics, a request's mean: the model took time, and with the queue fits in the client's p99.
        assert row["server_compute_ms"] > 0 and row["server_queue_ms"] + row["server_compute_ms"] <= row["p99_ms"], row
    assert rows[1]["server_queue_ms"] > 0, rows[1]  # at 2, one request waits while the other is in the model


@pytest.mark.slow
def test_perf_analyzer_over_http_with_no_request_parameters_costs_what_a_segment_call_costs(
    server: ServerThread, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """perf_analyzer names every output the model lists and, over HTTP, can send no request parameter: each
    of its requests must still ask the model for exactly the work of a Segment call (the mask PNG and the
    classes; no overlay, no full-size label map)."""
    assert PERF_ANALYZER, "perf_analyzer comes with tritonclient's x86_64 wheel (the dev extra)"
    model = server.app.pipeline.models.get("")
    asked: list[ResolvedOptions] = []
    segment = model.segment

    async def spy(data: Any, options: ResolvedOptions, deadline: float | None) -> Any:
        asked.append(options)
        return await segment(data, options, deadline)

    monkeypatch.setattr(model, "segment", spy)
    with SegmentClient(server.target, timeout=60) as client:
        client.segment(input_data_image())
    (segment_call,) = asked
    asked.clear()
    done = subprocess.run(
        [PERF_ANALYZER, "-m", model.name, "-i", "http", "-u", f"127.0.0.1:{server.app.http_port}",
         "--input-data", str(input_data(tmp_path / "input.json")), "--concurrency-range", "1:1",
         "--measurement-interval", "500", "--stability-percentage", "100", "--max-trials", "3"],
        env=perf_analyzer.environment(),
        capture_output=True, text=True, timeout=240, check=False,
    )  # fmt: skip
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    assert asked, "perf_analyzer's requests reached the model"

    def work(options: ResolvedOptions) -> tuple[bool, bool, float | None, int]:
        return options.mask_png, options.label_map, options.overlay_opacity, options.max_size

    served = (True, False, None, model.settings.max_size)  # no overlay, the model's own size
    assert {work(options) for options in asked} == {work(segment_call)} == {served}


def test_the_input_data_order_meets_every_image_equally_at_every_stride() -> None:
    order = perf_analyzer.input_data_order(8)
    for stride in (1, 2, 3, 4, 8):
        for start in range(len(order)):
            walk = [order[(start + stride * k) % len(order)] for k in range(len(order))]
            assert sorted(Counter(walk).values()) == [len(order) // 8] * 8, (stride, start)


@pytest.mark.slow
def test_perf_analyzer_at_concurrency_4_sends_every_image_of_the_bench_data(
    server: ServerThread, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """perf_analyzer at concurrency C takes every C-th --input-data entry: with one entry per image, at 4 it
    sent the first image only. The bench's order must send the images in the mix loadgen sends."""
    assert PERF_ANALYZER, "perf_analyzer comes with tritonclient's x86_64 wheel (the dev extra)"
    model = server.app.pipeline.models.get("")
    images = [encode(Image.new("RGB", (40 + 8 * k, 30 + 6 * k), (50 * k, 90, 160))) for k in range(4)]
    sent: Counter[int] = Counter()
    segment = model.segment

    async def spy(data: Any, options: ResolvedOptions, deadline: float | None) -> Any:
        sent[images.index(bytes(data))] += 1
        return await segment(data, options, deadline)

    monkeypatch.setattr(model, "segment", spy)
    done = subprocess.run(
        [PERF_ANALYZER, "-m", model.name, "-i", "grpc", "-u", f"127.0.0.1:{server.port}",
         "--input-data", str(perf_analyzer.write_input_data(images, tmp_path / "input.json")),
         "--concurrency-range", "4:4", "--measurement-interval", "1000", "--stability-percentage", "100",
         "--max-trials", "3"],
        env=perf_analyzer.environment(),
        capture_output=True, text=True, timeout=240, check=False,
    )  # fmt: skip
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    assert sorted(sent) == [0, 1, 2, 3], f"images sent (index: requests): {dict(sent)}"
    assert max(sent.values()) <= 2 * min(sent.values()), f"images sent (index: requests): {dict(sent)}"
