"""Triton's perf_analyzer against segserve's Open Inference Protocol doors, for `make bench` and the tests.

perf_analyzer ships inside tritonclient's manylinux x86_64 wheel (the dev extra). It links libcudart.so.12,
which PyPI's nvidia-cuda-runtime-cu12 provides and which loads without a GPU, and Debian's libb64-0d.
Each request carries one encoded image as IMAGE (BYTES [1]); the input data cycles through the bench's
images, as bench.loadgen does. It runs with its defaults: it names every output the model lists (MASK_PNG
and CLASSES, what a Segment call answers), so over gRPC and HTTP alike both tools measure the same work.
"""

from __future__ import annotations

import base64
import csv
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from server.inference import tensors


def binary() -> str | None:
    """perf_analyzer beside this interpreter (the venv's bin, where the wheel puts it), else on PATH."""
    return shutil.which("perf_analyzer", path=str(Path(sys.executable).parent)) or shutil.which("perf_analyzer")


def cuda_runtime_library_dir() -> str:
    """The folder of libcudart.so.12 from nvidia-cuda-runtime-cu12: perf_analyzer needs it even without a GPU."""
    import nvidia.cuda_runtime  # type: ignore[import-untyped]  # a namespace package, x86_64 only

    return str(Path(next(iter(nvidia.cuda_runtime.__path__))) / "lib")


def environment() -> dict[str, str]:
    library = cuda_runtime_library_dir()
    inherited = os.environ.get("LD_LIBRARY_PATH")
    return {**os.environ, "LD_LIBRARY_PATH": f"{library}:{inherited}" if inherited else library}


def input_data_order(count: int) -> list[int]:
    """Which image each of perf_analyzer's --input-data entries holds: count**2 entries, entry j image
    (j + j // count) % count. perf_analyzer at concurrency C takes every C-th entry (measured with 8 entries:
    at concurrency 8 it sent the first one only, at 4 the first and fifth), so one entry per image would
    send another mix of images at each concurrency. In this order a walk of any stride that divides `count`,
    or is prime to it, from any entry, meets every image equally often."""
    return [(j + j // count) % count for j in range(count * count)]


def write_input_data(images: Sequence[bytes], path: Path) -> Path:
    """perf_analyzer's --input-data: each entry a BYTES tensor as base64 of an image's raw layout, in
    input_data_order so that every concurrency sends the same mix of images that loadgen sends."""
    encoded = [{"IMAGE": {"b64": base64.b64encode(tensors.to_raw([image])).decode()}} for image in images]
    entries = [encoded[k] for k in input_data_order(len(images))]
    path.write_text(json.dumps({"data": entries}))
    return path


def run(
    model: str,
    url: str,
    protocol: str,
    input_data: Path,
    concurrency: Sequence[int],
    window_ms: int,
    report: Path,
    *,
    stability_percentage: int = 15,
    max_trials: int = 6,
    timeout: float = 1800,
) -> list[dict[str, Any]]:
    """Runs perf_analyzer at each concurrency; returns one row per step: images/s and latencies in ms.
    Raises RuntimeError with perf_analyzer's output when it fails."""
    program = binary()
    if program is None:
        raise RuntimeError("perf_analyzer not found: it comes with tritonclient's x86_64 wheel (the dev extra)")
    rows: list[dict[str, Any]] = []
    for level in concurrency:
        step_report = report.with_name(f"{report.stem}-{protocol}-c{level}{report.suffix}")
        command = [
            program, "-m", model, "-i", protocol, "-u", url, "--input-data", str(input_data),
            "--concurrency-range", f"{level}:{level}", "--measurement-interval", str(window_ms),
            "--stability-percentage", str(stability_percentage), "--max-trials", str(max_trials),
            "-f", str(step_report),
        ]  # fmt: skip
        done = subprocess.run(command, env=environment(), capture_output=True, text=True, timeout=timeout, check=False)
        if done.returncode != 0 or not step_report.is_file():
            raise RuntimeError(
                f"{' '.join(command)} failed ({done.returncode}):\n{(done.stdout + done.stderr)[-3000:]}"
            )
        rows += [summarise(row, protocol) for row in csv.DictReader(step_report.open())]
    return rows


def summarise(row: dict[str, str], protocol: str) -> dict[str, Any]:
    """A perf_analyzer CSV row (latencies in microseconds) in the bench's units."""
    return {
        "protocol": protocol,
        "concurrency": int(row["Concurrency"]),
        "throughput": float(row["Inferences/Second"]),
        "p50_ms": int(row["p50 latency"]) / 1000,
        "p99_ms": int(row["p99 latency"]) / 1000,
        "server_queue_ms": int(row["Server Queue"]) / 1000,
        "server_compute_ms": int(row["Server Compute Infer"]) / 1000,
    }
