"""The server as a process: start-up errors, health through start-up, SIGTERM; the default model end to end."""

from __future__ import annotations

import asyncio
import re
import signal
import subprocess
import sys
import threading
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from client import SegmentClient, SegmentError
from server.app import create_app
from server.core.pipeline import SegmentationPipeline
from server.runtimes.factory import create_runtime
from server.settings import Settings
from tests.helpers.images import encode, photo_like
from tests.helpers.processes import ROOT, start_server, wait_for_status
from tests.helpers.servers import make_settings


def test_not_serving_until_warmed_up_then_serving() -> None:
    """Health answers during start-up: NOT_SERVING while the warm-up runs (held here), SERVING once it is done."""
    settings = make_settings(warmup=True)
    runtime = create_runtime(settings.model_settings())
    warming, release = threading.Event(), threading.Event()
    predict = runtime.predict

    def held_predict(images):  # type: ignore[no-untyped-def]
        warming.set()
        release.wait(60)
        return predict(images)

    runtime.predict = held_predict  # type: ignore[method-assign]
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    app = asyncio.run_coroutine_threadsafe(create_app(settings, SegmentationPipeline(settings, runtime)), loop).result(
        30
    )
    starting = asyncio.run_coroutine_threadsafe(app.start(), loop)
    target = f"127.0.0.1:{app.port}"

    def health() -> int:
        with grpc.insecure_channel(target) as channel:
            request = health_pb2.HealthCheckRequest(service="segserve.v1.Segmenter")
            return int(health_pb2_grpc.HealthStub(channel).Check(request, timeout=10).status)

    try:
        assert warming.wait(60), "the warm-up never started"
        assert health() == health_pb2.HealthCheckResponse.NOT_SERVING
        with SegmentClient(target, timeout=10) as client, pytest.raises(SegmentError) as refused:
            client.segment(encode(photo_like(32, 24)))
        assert refused.value.code == grpc.StatusCode.UNAVAILABLE
        assert not starting.done()
        release.set()
        starting.result(60)
        assert health() == health_pb2.HealthCheckResponse.SERVING
    finally:
        release.set()
        asyncio.run_coroutine_threadsafe(app.stop(1.0), loop).result(30)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)


def test_bad_weights_file_is_a_one_line_start_up_error(tmp_path: Path) -> None:
    process, _ = start_server("--weights", str(tmp_path / "missing.pth"))
    output, _ = process.communicate(timeout=120)
    assert process.returncode == 1
    errors = [line for line in output.splitlines() if "ERROR" in line]
    assert len(errors) == 1 and "missing.pth does not exist" in errors[0]
    assert "Traceback" not in output


def test_invalid_setting_is_a_clear_error() -> None:
    process, _ = start_server("--max-batch-size", "zero")
    output, _ = process.communicate(timeout=60)
    assert process.returncode == 2 and "max_batch_size" in output and "Traceback" not in output


def help_entries(output: str) -> dict[str, str]:
    """Each flag's own entry of argparse's help, its lines joined: {"--port": "gRPC port (0 picks ...) [env ...]"}."""
    entries: dict[str, str] = {}
    flags: list[str] = []
    for line in output.split("options:", 1)[1].splitlines():
        header = re.match(r"^  (-[^ ].*?)(?:  +(.*))?$", line)
        if header:  # "  --port PORT   help..." or "  --warmup, --no-warmup"
            flags = re.findall(r"(--?[a-z][a-z0-9-]*)", header.group(1))
            for flag in flags:
                entries[flag] = header.group(2) or ""
        elif flags:
            for flag in flags:
                entries[flag] = (entries[flag] + " " + line.strip()).strip()
    return entries


def test_help_lists_every_setting_with_its_default() -> None:
    output = subprocess.run(
        [sys.executable, "-m", "server", "--help"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout
    entries = help_entries(output)
    for name in Settings.model_fields:
        flag = "--" + name.replace("_", "-")
        assert flag in entries, f"{flag} has no entry of its own in --help"
        assert f"[env SEGSERVE_{name.upper()}, default: " in entries[flag], (flag, entries[flag])
    for flag, default in [
        ("--port", "50051"),
        ("--http-port", "8000"),
        ("--max-size", "512"),
        ("--max-batch-size", "8"),
        ("--max-batch-delay-ms", "5.0"),
        ("--weights", "auto"),
        ("--device", "auto"),
        ("--runtime", "auto"),
        ("--model", "deeplabv3_mobilenet_v3_large"),
        ("--warmup", "True"),
    ]:
        assert entries[flag].endswith(f"default: {default}]"), (flag, entries[flag])


def test_default_model_end_to_end_then_sigterm_drains_and_exits_zero() -> None:
    """Default architecture and default max size, SIGTERM: exit 0. (NOT_SERVING until warm: the test below.)"""
    process, target = start_server("--weights", "random", env={"SEGSERVE_GRACE_PERIOD_S": "5"})
    try:
        seen = wait_for_status(target, health_pb2.HealthCheckResponse.SERVING, timeout=120)
        assert seen[-1] == health_pb2.HealthCheckResponse.SERVING
        with SegmentClient(target) as client:
            result = client.segment(encode(photo_like(800, 600), "JPEG"))
            assert result.mask.shape == (600, 800) and result.model_size == (512, 384)
        process.send_signal(signal.SIGTERM)
        output, _ = process.communicate(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 0, output
    assert "shutting down" in output and "Traceback" not in output


@pytest.mark.parametrize("sig", [signal.SIGINT])
def test_ctrl_c_also_exits_zero(sig: signal.Signals) -> None:
    process, target = start_server("--weights", "random", "--max-size", "64", "--no-warmup")
    try:
        wait_for_status(target, health_pb2.HealthCheckResponse.SERVING, timeout=120)
        process.send_signal(sig)
        output, _ = process.communicate(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 0, output
