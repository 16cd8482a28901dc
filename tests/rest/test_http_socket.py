"""The HTTP port's socket, as server.rest.server.bind makes it: connections it accepts have Nagle's algorithm
off, as asyncio's own servers do; on "[::]" it takes IPv4 too; it reuses its address and claims the port when
bound. Checked on the helper's socket, then on the running server's own listening socket."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Iterator

import httpx
import pytest

from server.rest.server import bind, create_http_server
from tests.helpers.servers import ServerThread, make_settings


def test_accepted_connections_send_small_writes_at_once() -> None:
    async def nodelay_of_a_connection() -> int:
        seen: asyncio.Future[int] = asyncio.get_running_loop().create_future()

        class Probe(asyncio.Protocol):
            def connection_made(self, transport: asyncio.BaseTransport) -> None:
                accepted = transport.get_extra_info("socket")
                seen.set_result(accepted.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))
                transport.close()

        listening = bind("127.0.0.1", 0)
        server = await asyncio.get_running_loop().create_server(Probe, sock=listening)  # as uvicorn does
        try:
            port = listening.getsockname()[1]
            _, writer = await asyncio.open_connection("127.0.0.1", port)
            result = await asyncio.wait_for(seen, 10)
            writer.close()
            return result
        finally:
            server.close()
            await server.wait_closed()

    assert asyncio.run(nodelay_of_a_connection()) != 0


@pytest.fixture(scope="module")
def on_every_address() -> Iterator[ServerThread]:
    """A server on the default bind address, "[::]", as deployments run it."""
    server = ServerThread(make_settings(host="[::]", warmup=False))
    yield server
    server.stop()


def listening_socket(server: ServerThread) -> socket.socket:
    """The socket the running HTTP port accepts on: what uvicorn's server really listens with."""
    assert server.app.http is not None
    (listener,) = server.app.http.server.servers
    (sock,) = listener.sockets
    return sock  # type: ignore[return-value]  # asyncio's TransportSocket: getsockopt and family as a socket's


def test_the_running_http_port_takes_ipv4_and_ipv6_and_reuses_its_address(on_every_address: ServerThread) -> None:
    """On "[::]" the HTTP port is dual-stack as gRPC's is (one port for IPv4 and IPv6 callers), and it can be
    bound again at once after a restart (SO_REUSEADDR), with connections of the old process in TIME_WAIT."""
    sock = listening_socket(on_every_address)
    assert sock.family == socket.AF_INET6
    assert sock.getsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY) == 0
    assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR) != 0
    assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN) != 0
    port = on_every_address.app.http_port
    for host in ("127.0.0.1", "[::1]"):
        assert httpx.get(f"http://{host}:{port}/v2/health/live", timeout=10).status_code == 200, host


def test_the_running_http_port_sends_small_writes_at_once(on_every_address: ServerThread) -> None:
    """The connections the running HTTP port accepts have Nagle's algorithm off (see the test above)."""

    async def nodelay_of_open_connections() -> list[int]:
        assert on_every_address.app.http is not None
        connections = on_every_address.app.http.server.server_state.connections
        return [
            c.transport.get_extra_info("socket").getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) for c in connections
        ]

    with httpx.Client(base_url=f"http://127.0.0.1:{on_every_address.app.http_port}", timeout=10) as kept_open:
        assert kept_open.get("/v2/health/live").status_code == 200
        nodelay = on_every_address.call(nodelay_of_open_connections())
    assert nodelay and all(value != 0 for value in nodelay), nodelay


def test_a_second_server_cannot_take_the_running_http_port(
    on_every_address: ServerThread, caplog: pytest.LogCaptureFixture
) -> None:
    """The port is claimed from the moment it is bound: another server on the same port (a replica started on
    the same host network by mistake) goes on without HTTP, logged, instead of sharing or stealing it."""
    port = on_every_address.app.http_port
    assert port is not None
    for host in ("[::]", "127.0.0.1"):
        assert create_http_server(None, make_settings(host=host, http_port=port)) is None, host
        assert f"HTTP port not started on {host}:{port}" in caplog.text
    assert httpx.get(f"http://127.0.0.1:{port}/v2/health/live", timeout=10).status_code == 200
