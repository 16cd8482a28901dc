"""Callers that hold the HTTP port (issue 40, points 3 and 5): a request head that never completes is closed after
SEGSERVE_HTTP_HEADER_TIMEOUT_S (the TLS handshake too), connections beyond SEGSERVE_HTTP_MAX_CONNECTIONS are
answered 503 while gRPC keeps answering, the open-file limit is raised to the hard one at start, and big JSON
bodies are parsed in the JSON worker's child process, so gRPC health answers while they are (within 100 ms is
the aim; HEALTH_BOUND_S leaves room for a loaded machine, and a parse in the server's own process went over it:
json.loads holds the GIL for the whole body)."""

from __future__ import annotations

import os
import resource
import socket
import ssl
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from bench.json_health import SIDE, pixels_json
from tests.helpers.servers import ServerThread, make_settings
from tests.helpers.sockets import closed_within

HEADER_TIMEOUT_S = 1.0
MAX_CONNECTIONS = 40
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def bounded() -> Iterator[ServerThread]:
    server = ServerThread(
        make_settings(warmup=False, http_header_timeout_s=HEADER_TIMEOUT_S, http_max_connections=MAX_CONNECTIONS)
    )
    yield server
    server.stop()


def connect(port: int, sent: bytes = b"") -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    if sent:
        sock.sendall(sent)
    return sock


def health_answers(target: str, timeout: float = 2.0) -> bool:
    with grpc.insecure_channel(target) as channel:  # a new connection, as a kubelet's probe makes
        try:
            answer = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=timeout)
        except grpc.RpcError:
            return False
    return answer.status == health_pb2.HealthCheckResponse.SERVING


def live(port: int) -> int:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/v2/health/live", timeout=10) as response:
        return int(response.status)


def test_a_request_head_that_never_completes_is_closed_after_the_header_timeout(bounded: ServerThread) -> None:
    port = bounded.app.http_port
    assert port
    trickling = [connect(port, b"POST /v2/models/x/infer HTTP/1.1\r\nHost: segserve\r\n") for _ in range(20)]
    silent = [connect(port) for _ in range(5)]
    try:
        started = time.monotonic()
        for _ in range(4):  # a byte now and then does not extend the timeout
            time.sleep(HEADER_TIMEOUT_S / 4)
            for sock in trickling:
                sock.sendall(b"X")
        for sock in trickling + silent:
            closed, received = closed_within(sock, HEADER_TIMEOUT_S * 3)
            assert closed, "a connection with an incomplete head was still open"
            assert received.startswith(b"HTTP/1.1 408")
        assert time.monotonic() - started < HEADER_TIMEOUT_S * 4
        assert live(port) == 200  # the port itself serves on
    finally:
        for sock in trickling + silent:
            sock.close()


def test_between_requests_a_new_head_gets_the_same_timeout(bounded: ServerThread) -> None:
    port = bounded.app.http_port
    assert port
    with connect(port, b"GET /v2/health/live HTTP/1.1\r\nHost: segserve\r\n\r\n") as sock:
        sock.settimeout(10)
        first = b""
        while not first.endswith(b'{"live":true}'):  # the whole first answer, head and body
            chunk = sock.recv(4096)
            assert chunk, f"closed after {first!r}"
            first += chunk
        assert first.startswith(b"HTTP/1.1 200")
        sock.sendall(b"GET /v2/health/live HTTP/1.1\r\nHo")  # the next head begun, never finished
        closed, received = closed_within(sock, HEADER_TIMEOUT_S * 3)
        assert closed and received.startswith(b"HTTP/1.1 408")


def test_a_complete_head_is_not_timed_out(bounded: ServerThread) -> None:
    """The timeout is the head's: a body may take longer (its own idle timeout bounds it)."""
    port = bounded.app.http_port
    assert port
    head = b"POST /v1/segment HTTP/1.1\r\nHost: segserve\r\nContent-Type: image/png\r\nContent-Length: 10\r\n\r\n"
    with connect(port, head + b"12345") as sock:
        closed, _ = closed_within(sock, HEADER_TIMEOUT_S * 2)
        assert not closed


def test_beyond_the_connection_limit_new_connections_get_503_and_grpc_answers(bounded: ServerThread) -> None:
    port = bounded.app.http_port
    assert port
    held = [connect(port, b"GET /v2/health/live HTTP/1.1\r\n") for _ in range(MAX_CONNECTIONS)]
    try:
        time.sleep(0.2)  # all accepted
        started = time.monotonic()
        beyond = [connect(port) for _ in range(60)]
        for sock in beyond:
            closed, received = closed_within(sock, 5)
            assert closed and received.startswith(b"HTTP/1.1 503"), received[:40]
            sock.close()
        assert time.monotonic() - started < HEADER_TIMEOUT_S  # answered at once, not when the others time out
        assert health_answers(bounded.target)
    finally:
        for sock in held:
            sock.close()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:  # once they are gone, a new caller is served
        try:
            assert live(port) == 200
            break
        except OSError:
            time.sleep(0.1)
    else:
        pytest.fail("the HTTP port did not serve again after its connections closed")


def test_a_tls_handshake_that_never_completes_is_closed_after_the_header_timeout(certs: Path) -> None:
    server = ServerThread(
        make_settings(
            warmup=False,
            http_header_timeout_s=HEADER_TIMEOUT_S,
            tls_cert=str(certs / "server.pem"),
            tls_key=str(certs / "server.key"),
        )
    )
    try:
        port = server.app.http_port
        assert port
        silent = [connect(port) for _ in range(5)]  # TCP only: no ClientHello
        try:
            for sock in silent:
                closed, _ = closed_within(sock, HEADER_TIMEOUT_S * 4)
                assert closed, "a connection that never began its TLS handshake was still open"
        finally:
            for sock in silent:
                sock.close()
        context = ssl.create_default_context(cafile=str(certs / "ca.pem"))
        with urllib.request.urlopen(f"https://127.0.0.1:{port}/v2/health/live", context=context, timeout=10) as answer:
            assert answer.status == 200
    finally:
        server.stop()


def test_the_open_file_limit_is_raised_to_the_hard_one_at_start(tmp_path: Path) -> None:
    """`python -m server`'s main, in a child whose soft limit starts low; serve() itself is left out."""
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    soft = min(256, hard)
    code = (
        "import asyncio, resource, server.__main__ as main\n"
        "async def serve(settings): return 0\n"
        "main.serve = serve\n"
        "assert main.main(['--weights', 'random', '--metrics-port', '-1', '--http-port', '-1']) == 0\n"
        "print(*resource.getrlimit(resource.RLIMIT_NOFILE))\n"
    )

    def start_low() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))

    child = subprocess.run(
        [sys.executable, "-c", code],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        preexec_fn=start_low,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert child.returncode == 0, child.stderr[-2000:]
    assert child.stdout.split() == [str(hard), str(hard)]
    assert f"limit raised from {soft} to the hard limit {hard}" in child.stderr or soft == hard


# ---- JSON bodies off the event loop ---------------------------------------------------------------------------

JSON_BODIES = 4
HEALTH_BOUND_S = 0.15


def test_grpc_health_answers_while_big_json_bodies_are_parsed(server: ServerThread) -> None:
    port = server.app.http_port
    assert port
    body = pixels_json(SIDE)  # the benchmark's body (bench/json_health.py), about 8 MB
    assert 7_000_000 < len(body) <= server.settings.max_message_bytes
    url = f"http://127.0.0.1:{port}/v2/models/{server.settings.model}/infer"
    answers: list[int] = []

    def post() -> None:
        request = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=120) as response:
            answers.append(response.status)

    with grpc.insecure_channel(server.target) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        health.Check(health_pb2.HealthCheckRequest(), timeout=10)  # connected before the bodies arrive
        senders = [threading.Thread(target=post) for _ in range(JSON_BODIES)]
        for sender in senders:
            sender.start()
        waits: list[float] = []
        deadline = time.monotonic() + 120
        while any(sender.is_alive() for sender in senders) and time.monotonic() < deadline:
            started = time.monotonic()
            health.Check(health_pb2.HealthCheckRequest(), timeout=30)
            waits.append(time.monotonic() - started)
            time.sleep(0.01)
        for sender in senders:
            sender.join(10)
    assert answers == [200] * JSON_BODIES
    assert len(waits) >= 5, "the bodies were answered before health was asked: nothing measured"
    assert max(waits) < HEALTH_BOUND_S, f"health waited {max(waits):.2f}s (p50 {sorted(waits)[len(waits) // 2]:.3f}s)"
