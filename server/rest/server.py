"""The HTTP port: uvicorn serving server.rest.app's ASGI app in the server's own event loop.

Bound when the app is built (so port 0 reports the port it got), started with the gRPC server, stopped
with it. Same bind address and TLS files as gRPC. uvicorn's own signal handling and logging setup are
left out: the server's signal handlers stop both ports, and its logging is already configured.

No connection is held open forever, and the HTTP door cannot take every file descriptor: a connection must
send its request head within SEGSERVE_HTTP_HEADER_TIMEOUT_S (the TLS handshake too), and beyond
SEGSERVE_HTTP_MAX_CONNECTIONS open connections a new one is answered 503 and closed (BoundedH11Protocol).
"""

from __future__ import annotations

import asyncio
import errno
import logging
import resource
import socket
import ssl
import time
from collections.abc import Callable
from typing import Any

import h11
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol
from uvicorn.server import ServerState

from server.settings import Settings

log = logging.getLogger(__name__)

HTTP_DISABLED = -1
LISTEN_BACKLOG = 2048  # uvicorn's default; it listens again with its own
REFUSAL_LOG_INTERVAL_S = 60.0
"""Refused connections and descriptors run out are logged once, then at most once a minute (with a count):
a flood is one line, not one per accept."""


def closing_answer(status: str, text: str, *headers: str) -> bytes:
    """A whole HTTP/1.1 answer that ends its connection, for the bounds below (sent before or without h11)."""
    body = text.encode() + b"\r\n"
    head = [f"HTTP/1.1 {status}", "content-type: text/plain; charset=utf-8", "connection: close", *headers]
    return "\r\n".join([*head, f"content-length: {len(body)}", "", ""]).encode() + body


TIMED_OUT = closing_answer("408 Request Timeout", "the request head did not arrive in time")
BUSY = closing_answer("503 Service Unavailable", "too many connections; retry later", "retry-after: 1")


class OnceInAWhile:
    """Logs the first of a run of like events at once, and later ones at most every REFUSAL_LOG_INTERVAL_S
    with how many there were since: the log says that something happens without growing with each event."""

    def __init__(self, level: int, message: str) -> None:
        self.level = level
        self.message = message
        self.unlogged = 0
        self.last = -REFUSAL_LOG_INTERVAL_S

    def happened(self, *args: object) -> None:
        self.unlogged += 1
        now = time.monotonic()
        if now - self.last < REFUSAL_LOG_INTERVAL_S:
            return
        if self.unlogged > 1:
            log.log(self.level, self.message + " (%d times since the last such line)", *args, self.unlogged)
        else:
            log.log(self.level, self.message, *args)
        self.unlogged = 0
        self.last = now


class ConnectionBounds:
    """What every connection of one HTTP port shares: the head timeout, the connection cap, their log lines."""

    def __init__(self, header_timeout_s: float, max_connections: int, port: int) -> None:
        self.header_timeout_s = header_timeout_s
        self.max_connections = max_connections
        self.refusals = OnceInAWhile(
            logging.WARNING,
            f"HTTP port {port}: %d connections open (SEGSERVE_HTTP_MAX_CONNECTIONS); new ones are answered 503",
        )
        self.timeouts = OnceInAWhile(
            logging.INFO,
            f"HTTP port {port}: closed a connection that sent no complete request head in %gs "
            "(SEGSERVE_HTTP_HEADER_TIMEOUT_S)",
        )


class BoundedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with the two bounds uvicorn does not have. uvicorn (0.54) times out a connection
    only between requests (timeout_keep_alive) and answers 503 past limit_concurrency only to a request whose
    head has arrived, so a caller that sends a head slowly, or never, holds its socket for good: enough such
    sockets take every descriptor of the process, and gRPC stops accepting (docs/operations.md, 'Connections
    and file descriptors').

    Done here, in the asyncio protocol, because this is the one place that sees a connection from its accept
    and sees h11's state: an ASGI middleware runs only once a head is complete, too late for both, and a
    socket-level watchdog cannot tell a slow head from a slow body or a response being sent.
    - Head timeout: a connection waiting for a request head (h11's client state IDLE) gets `header_timeout_s`
      from its connection, or between requests from the head's first byte (before that, uvicorn's keep-alive
      timeout holds); trickling bytes does not extend it. Then 408 and close.
    - Connection cap: beyond `max_connections` connections of this port, a new one is answered 503 (with
      Retry-After) and closed at once, holding its descriptor for no longer than that. A caller that already
      sent its request may see the connection reset instead of the 503.
    """

    def __init__(
        self,
        config: uvicorn.Config,
        server_state: ServerState,
        app_state: dict[str, Any],
        bounds: ConnectionBounds,
        _loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        super().__init__(config, server_state, app_state, _loop)
        self.bounds = bounds
        self.head_timer: asyncio.TimerHandle | None = None
        self.refused = False

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        if len(self.connections) >= self.bounds.max_connections:
            self.refused = True
            self.bounds.refusals.happened(len(self.connections))
            transport.write(BUSY)
            transport.close()
            return
        super().connection_made(transport)
        self._await_head()

    def data_received(self, data: bytes) -> None:
        if self.refused:
            return
        super().data_received(data)
        if self.conn.their_state is h11.IDLE:
            self._await_head()  # a head begun (or still to come after a request): the clock runs from here
        else:
            self._stop_head_timer()  # the head is complete: bodies and answers have their own bounds

    def connection_lost(self, exc: Exception | None) -> None:
        self._stop_head_timer()
        if not self.refused:
            super().connection_lost(exc)

    def _await_head(self) -> None:
        if self.head_timer is None and not self.transport.is_closing():
            self.head_timer = self.loop.call_later(self.bounds.header_timeout_s, self._head_timed_out)

    def _stop_head_timer(self) -> None:
        if self.head_timer is not None:
            self.head_timer.cancel()
            self.head_timer = None

    def _head_timed_out(self) -> None:
        self.head_timer = None
        if self.transport.is_closing() or self.conn.their_state is not h11.IDLE:
            return
        self.bounds.timeouts.happened(self.bounds.header_timeout_s)
        self.transport.write(TIMED_OUT)
        self.transport.close()


def log_when_descriptors_run_out(loop: asyncio.AbstractEventLoop) -> None:
    """One clear log line when accepting fails for want of descriptors, instead of asyncio's traceback every
    second per listening socket (asyncio then waits a second and accepts again on its own). Other reports go
    to the handler that was there before. The HTTP and metrics ports share the loop, so this covers both."""
    previous = loop.get_exception_handler()
    out_of_files = OnceInAWhile(
        logging.ERROR,
        "out of file descriptors: accepting a connection failed (%s); connections wait in the listen backlog "
        "until some close. Raise the open-file limit (ulimit -n, LimitNOFILE) or lower "
        "SEGSERVE_HTTP_MAX_CONNECTIONS",
    )

    def handle(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        exc = context.get("exception")
        if isinstance(exc, OSError) and exc.errno in (errno.EMFILE, errno.ENFILE):
            out_of_files.happened(exc.strerror)
        elif previous is not None:
            previous(loop, context)
        else:
            loop.default_exception_handler(context)

    if getattr(previous, "segserve_descriptors", False):
        return  # already installed (several servers in one loop)
    handle.segserve_descriptors = True  # type: ignore[attr-defined]
    loop.set_exception_handler(handle)


def bind(host: str, port: int) -> socket.socket:
    """A listening-ready socket on the gRPC bind address ("[::]" and "0.0.0.0" as gRPC takes them)."""
    address = host.strip("[]")
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    # Naming the protocol matters: asyncio turns Nagle's algorithm off only on sockets whose proto is
    # IPPROTO_TCP, and a socket made with proto 0 passes that 0 on to every connection it accepts. With Nagle
    # on, uvicorn's two writes of a response (head, then body) met the client's delayed ACK, and every HTTP
    # call waited for it (docs/performance.md, 'The HTTP door's 40 ms at concurrency 1').
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if family == socket.AF_INET6:
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)  # "[::]" takes IPv4 too, as gRPC's does
    sock.bind((address, port))
    # Listening at once claims the port now: with SO_REUSEADDR, two servers can both bind a port that no one
    # listens on yet, and the second then failed at start-up, where it stopped the whole server (replicas
    # sharing a host network did: docs/scaling.md, 'Tested on one machine').
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


def connection_cap(configured: int) -> int:
    """SEGSERVE_HTTP_MAX_CONNECTIONS, or half the process's open-file limit when that is lower (logged): HTTP
    callers can then never take the descriptors that gRPC, the metrics port and the models need."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or configured <= soft // 2:
        return configured
    log.warning(
        "HTTP connections capped at %d, half the open-file limit of %d (SEGSERVE_HTTP_MAX_CONNECTIONS is %d)",
        soft // 2,
        soft,
        configured,
    )
    return max(1, soft // 2)


class HttpServer:
    def __init__(self, app: Any, settings: Settings, sock: socket.socket) -> None:
        self.socket = sock
        self.port: int = sock.getsockname()[1]
        cap = connection_cap(settings.http_max_connections)
        self.bounds = ConnectionBounds(settings.http_header_timeout_s, cap, self.port)
        self.config = uvicorn.Config(
            app,
            http="h11",  # BoundedH11Protocol serves; this names what it is built on
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
        """Serves on the bound socket. The listener is made here rather than by uvicorn's startup, for the two
        things that startup does not let one choose: the protocol (BoundedH11Protocol, with its bounds) and
        the TLS handshake's timeout (asyncio's default is 60 s, during which a connection is not yet counted)."""
        config = self.config
        config.load()
        server = self.server
        server.lifespan = config.lifespan_class(config)  # "off": nothing to start
        loop = asyncio.get_running_loop()
        log_when_descriptors_run_out(loop)
        server.servers = [
            await loop.create_server(
                self._protocol_factory(loop),
                sock=self.socket,
                ssl=config.ssl,
                backlog=LISTEN_BACKLOG,
                ssl_handshake_timeout=self.bounds.header_timeout_s if config.ssl else None,
            )
        ]
        server.started = True
        self._main = asyncio.create_task(server.main_loop())
        log.info("HTTP on %s://%s:%d (/v2, /v1/segment)", self.scheme, config.host, self.port)

    def _protocol_factory(self, loop: asyncio.AbstractEventLoop) -> Callable[[], asyncio.Protocol]:
        config, state, bounds = self.config, self.server.server_state, self.bounds

        def protocol() -> asyncio.Protocol:
            return BoundedH11Protocol(config, state, self.server.lifespan.state, bounds, loop)

        return protocol

    async def stop(self) -> None:
        """Stops taking connections, lets requests in progress finish (within the grace period), then closes."""
        if self._main is None:
            self.socket.close()
            return
        self.server.should_exit = True
        await self._main
        await self.server.shutdown(sockets=[self.socket])
        self._main = None
