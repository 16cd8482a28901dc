"""The metrics port is bounded (issue 40, point 7): served on the event loop, so idle connections take no thread
each; a request head must arrive within SEGSERVE_HTTP_HEADER_TIMEOUT_S; at most METRICS_MAX_CONNECTIONS at once;
under TLS it speaks TLS with the server's certificate (and client CA); what it answers is prometheus_client's own
exposition of the app's registry."""

from __future__ import annotations

import gzip
import socket
import ssl
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client import CONTENT_TYPE_PLAIN_0_0_4, generate_latest
from prometheus_client.openmetrics.exposition import CONTENT_TYPE_LATEST as OPENMETRICS
from prometheus_client.parser import text_string_to_metric_families

from server.operations.metrics import METRICS_MAX_CONNECTIONS
from tests.helpers.servers import ServerThread, make_settings
from tests.helpers.sockets import closed_within

HEADER_TIMEOUT_S = 1.0
IDLE_SOCKETS = 300


@pytest.fixture(scope="module")
def bounded() -> Iterator[ServerThread]:
    server = ServerThread(make_settings(warmup=False, http_header_timeout_s=HEADER_TIMEOUT_S, http_port=-1))
    yield server
    server.stop()


def metrics_port(server: ServerThread) -> int:
    port = server.app.metrics_port
    assert port
    return port


def scrape(port: int, headers: dict[str, str] | None = None, scheme: str = "http", **kwargs: object) -> tuple:
    request = urllib.request.Request(f"{scheme}://127.0.0.1:{port}/metrics", headers=headers or {})
    with urllib.request.urlopen(request, timeout=10, **kwargs) as response:  # type: ignore[arg-type]
        return response.status, dict(response.headers), response.read()


def names(text: str) -> set[str]:
    return {family.name for family in text_string_to_metric_families(text)}


def test_idle_connections_take_no_thread_each(bounded: ServerThread) -> None:
    port = metrics_port(bounded)
    before = threading.active_count()
    idle = [socket.create_connection(("127.0.0.1", port), timeout=10) for _ in range(IDLE_SOCKETS)]
    try:
        time.sleep(0.5)  # accepted, and given whatever they would be given
        grown = threading.active_count() - before
    finally:
        for sock in idle:
            sock.close()
    assert grown < 10, f"{IDLE_SOCKETS} idle connections to the metrics port added {grown} threads"
    deadline = time.monotonic() + 10
    while True:  # once they are gone, scrapes are answered
        try:
            status, _, body = scrape(port)
            break
        except (urllib.error.HTTPError, OSError):
            assert time.monotonic() < deadline, "the metrics port did not answer again"
            time.sleep(0.1)
    assert status == 200 and "segserve_queue_depth" in names(body.decode())


def test_a_request_head_must_arrive_in_time_and_connections_are_capped(bounded: ServerThread) -> None:
    port = metrics_port(bounded)
    held = [socket.create_connection(("127.0.0.1", port), timeout=10) for _ in range(METRICS_MAX_CONNECTIONS)]
    try:
        for sock in held[:10]:
            sock.sendall(b"GET /metrics HTTP/1.1\r\nHost")  # a head begun, never finished
        time.sleep(0.2)
        with socket.create_connection(("127.0.0.1", port), timeout=10) as beyond:
            closed, received = closed_within(beyond, HEADER_TIMEOUT_S / 2)
            assert closed and received.startswith(b"HTTP/1.1 503")
        started = time.monotonic()
        for sock in held:
            closed, received = closed_within(sock, HEADER_TIMEOUT_S * 3)
            assert closed and received.startswith(b"HTTP/1.1 408")
        assert time.monotonic() - started < HEADER_TIMEOUT_S * 3
    finally:
        for sock in held:
            sock.close()
    assert scrape(port)[0] == 200


def test_the_exposition_is_prometheus_clients_own(bounded: ServerThread) -> None:
    port = metrics_port(bounded)
    assert bounded.app.metrics is not None
    status, headers, body = scrape(port)
    assert status == 200 and headers["Content-Type"] == CONTENT_TYPE_PLAIN_0_0_4
    assert names(body.decode()) == names(generate_latest(bounded.app.metrics.registry).decode())
    _, headers, body = scrape(port, {"Accept-Encoding": "gzip"})
    assert headers["Content-Encoding"] == "gzip" and b"segserve_queue_limit" in gzip.decompress(body)
    _, headers, body = scrape(port, {"Accept": "application/openmetrics-text; version=1.0.0"})
    assert headers["Content-Type"].startswith(OPENMETRICS.split(";")[0]) and body.endswith(b"# EOF\n")
    request = urllib.request.Request(f"http://127.0.0.1:{port}/metrics?name[]=segserve_queue_limit")
    with urllib.request.urlopen(request, timeout=10) as response:
        assert names(response.read().decode()) == {"segserve_queue_limit"}


def tls_server(certs: Path, client_ca: bool) -> ServerThread:
    return ServerThread(
        make_settings(
            warmup=False,
            http_port=-1,
            tls_cert=str(certs / "server.pem"),
            tls_key=str(certs / "server.key"),
            tls_client_ca=str(certs / "ca.pem") if client_ca else None,
        )
    )


def test_under_tls_the_metrics_port_speaks_tls_only(certs: Path) -> None:
    server = tls_server(certs, client_ca=False)
    try:
        port = metrics_port(server)
        trusting = ssl.create_default_context(cafile=str(certs / "ca.pem"))
        status, _, body = scrape(port, scheme="https", context=trusting)
        assert status == 200 and "segserve_queue_depth" in names(body.decode())
        with pytest.raises((urllib.error.URLError, OSError)):  # plaintext gets no metrics
            scrape(port)
        with pytest.raises((urllib.error.URLError, OSError)):  # nor a caller that does not trust the certificate
            scrape(port, scheme="https", context=ssl.create_default_context())
    finally:
        server.stop()


def test_with_a_client_ca_the_metrics_port_takes_client_certificates_only(certs: Path) -> None:
    server = tls_server(certs, client_ca=True)
    try:
        port = metrics_port(server)
        anonymous = ssl.create_default_context(cafile=str(certs / "ca.pem"))
        with pytest.raises((urllib.error.URLError, OSError)):
            scrape(port, scheme="https", context=anonymous)
        certified = ssl.create_default_context(cafile=str(certs / "ca.pem"))
        certified.load_cert_chain(str(certs / "client.pem"), str(certs / "client.key"))
        status, _, body = scrape(port, scheme="https", context=certified)
        assert status == 200 and "segserve_queue_depth" in names(body.decode())
    finally:
        server.stop()
