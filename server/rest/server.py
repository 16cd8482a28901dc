"""The HTTP port: uvicorn serving server.rest.app's ASGI app in the server's own event loop.

Bound when the app is built (so port 0 reports the port it got), started with the gRPC server, stopped
with it. Same bind address and TLS files as gRPC. uvicorn's own signal handling and logging setup are
left out: the server's signal handlers stop both ports, and its logging is already configured.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl
from typing import Any

import uvicorn

from server.settings import Settings

log = logging.getLogger(__name__)

HTTP_DISABLED = -1
LISTEN_BACKLOG = 2048  # uvicorn's default; it listens again with its own


def bind(host: str, port: int) -> socket.socket:
    """A listening-ready socket on the gRPC bind address ("[::]" and "0.0.0.0" as gRPC takes them)."""
    address = host.strip("[]")
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    # Naming the protocol matters: asyncio turns Nagle's algorithm off only on sockets whose proto is
    # IPPROTO_TCP, and a socket made with proto 0 passes that 0 on to every connection it accepts. With Nagle
    # on, uvicorn's two writes of a response (head, then body) met the client's delayed ACK: every HTTP call
    # took 40 ms longer than its work (a 640x480 photo: 142 ms against Segment's 99 ms at concurrency 1).
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if family == socket.AF_INET6:
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)  # "[::]" takes IPv4 too, as gRPC's does
    sock.bind((address, port))
    # Listening at once claims the port now: with SO_REUSEADDR, two servers can both bind a port that no one
    # listens on yet, and the second then failed at start-up, where it stopped the whole server (three
    # replicas sharing a host network did, 1 run in 3).
    sock.listen(LISTEN_BACKLOG)
    sock.set_inheritable(True)
    return sock


def create_http_server(app: Any, settings: Settings) -> HttpServer | None:
    """The HTTP port, or None when off (-1) or when its port cannot be bound: gRPC serving matters more, so a
    taken port is logged loudly and the server goes on without HTTP (as with the metrics port)."""
    if settings.http_port == HTTP_DISABLED:
        return None
    try:
        sock = bind(settings.host, settings.http_port)
    except OSError as exc:
        log.error("HTTP port not started on %s:%d: %s; serving gRPC without it", settings.host, settings.http_port, exc)
        return None
    return HttpServer(app, settings, sock)


class HttpServer:
    def __init__(self, app: Any, settings: Settings, sock: socket.socket) -> None:
        self.socket = sock
        self.port: int = sock.getsockname()[1]
        self.config = uvicorn.Config(
            app,
            log_config=None,
            access_log=False,  # server.rest.app writes the per-call log line
            lifespan="off",
            ssl_certfile=settings.tls_cert,
            ssl_keyfile=settings.tls_key,
            ssl_ca_certs=settings.tls_client_ca,
            ssl_cert_reqs=ssl.CERT_REQUIRED if settings.tls_client_ca else ssl.CERT_NONE,
            timeout_graceful_shutdown=int(settings.grace_period_s) or 1,
            server_header=False,
        )
        self.server = uvicorn.Server(self.config)
        self._main: asyncio.Task[None] | None = None
        self.scheme = "https" if settings.tls_cert else "http"

    async def start(self) -> None:
        config = self.config
        config.load()
        self.server.lifespan = config.lifespan_class(config)
        await self.server.startup(sockets=[self.socket])
        self._main = asyncio.create_task(self.server.main_loop())
        log.info("HTTP on %s://%s:%d (/v2, /v1/segment)", self.scheme, config.host, self.port)

    async def stop(self) -> None:
        """Stops taking connections, lets requests in progress finish (within the grace period), then closes."""
        if self._main is None:
            self.socket.close()
            return
        self.server.should_exit = True
        await self._main
        await self.server.shutdown(sockets=[self.socket])
        self._main = None
