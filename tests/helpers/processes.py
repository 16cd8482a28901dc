"""`python -m server` as a real process: free ports, starting one, waiting on its health, its resident memory."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_server(*args: str, env: dict[str, str] | None = None) -> tuple[subprocess.Popen[str], str]:
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "server", "--host", "127.0.0.1", "--port", str(port), "--device", "cpu", *args],
        cwd=ROOT,
        env={**os.environ, "SEGSERVE_METRICS_PORT": "0", **(env or {})},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    return process, f"127.0.0.1:{port}"


def wait_for_status(target: str, wanted: int, timeout: float = 60) -> list[int]:
    seen: list[int] = []
    deadline = time.monotonic() + timeout
    with grpc.insecure_channel(target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            try:
                status = stub.Check(health_pb2.HealthCheckRequest(service="segserve.v1.Segmenter"), timeout=1).status
                if not seen or seen[-1] != status:
                    seen.append(status)
                if status == wanted:
                    return seen
            except grpc.RpcError:
                pass
            time.sleep(0.05)
    raise AssertionError(f"status {wanted} not reached; saw {seen}")


def rss_of(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")
