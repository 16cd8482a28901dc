"""Triton's perf_analyzer (the binary in tritonclient's x86_64 wheel) drives segserve over gRPC and HTTP."""

from __future__ import annotations

import base64
import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from server import tensors
from tests.conftest import ServerThread, encode
from tests.known_model import MODEL_NAME, Shape, render_scene

PERF_ANALYZER = shutil.which("perf_analyzer", path=str(Path(sys.executable).parent))


def cuda_runtime_library_dir() -> str:
    """libcudart.so.12, from PyPI's nvidia-cuda-runtime-cu12: perf_analyzer links it, and it loads without a GPU."""
    import nvidia.cuda_runtime  # a namespace package: found only where installed

    return str(Path(next(iter(nvidia.cuda_runtime.__path__))) / "lib")


def input_data(path: Path) -> Path:
    """perf_analyzer's --input-data: a BYTES tensor given as base64 of its raw form (length-prefixed elements)."""
    image = encode(Image.fromarray(render_scene(200, 150, [Shape("red", "disc", 0.4, 0.4, 0.25)])[0]))
    raw = base64.b64encode(tensors.to_raw([image])).decode()
    path.write_text(json.dumps({"data": [{"IMAGE": {"b64": raw}}]}))
    return path


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
        env={**os.environ, "LD_LIBRARY_PATH": cuda_runtime_library_dir()},
        capture_output=True, text=True, timeout=240, check=False,
    )  # fmt: skip
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    rows = list(csv.DictReader(report.open()))
    assert sorted(row["Concurrency"] for row in rows) == ["1", "2"]
    for row in rows:
        assert float(row["Inferences/Second"]) > 0 and int(row["p99 latency"]) > 0
    # the server's side of the report comes from ModelStatistics
    assert "Server:" in done.stdout and "compute infer" in done.stdout
