"""Prometheus metrics, one registry per app (several servers in one process never clash).

Per-request figures are counted by server.grpc.interceptor; the pipeline's state (queue depth, batch
sizes, model) is read at scrape time by a collector, so the request path carries no metric calls.

/metrics is served on the server's event loop (MetricsEndpoint), with the HTTP port's head timeout, a small
connection cap and, under TLS, the server's certificate and client CA.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote

from prometheus_client import (
    GC_COLLECTOR,
    PLATFORM_COLLECTOR,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
    make_wsgi_app,
)
from prometheus_client.core import GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

from server.errors import without_server_paths
from server.models.registry import ModelState

if TYPE_CHECKING:
    from server.core.pipeline import SegmentationPipeline

log = logging.getLogger(__name__)

METRICS_DISABLED = -1
METRICS_MAX_CONNECTIONS = 64
"""Connections the metrics port keeps open at once; beyond it a new one is answered 503 and closed. A few
scrapers (an HA pair of Prometheus servers, a person with curl) need a handful."""
MAX_HEAD_BYTES = 16 * 1024  # as h11's default on the HTTP port; a longer head is refused
LISTEN_BACKLOG = 128

# From a lone 64-pixel image on a GPU (milliseconds) to a full queue on a busy CPU (tens of seconds).
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class PipelineCollector(Collector):
    """Reads the pipeline at scrape time: admitted requests, batch sizes served, the model being served."""

    def __init__(self, pipeline: SegmentationPipeline) -> None:
        self.pipeline = pipeline

    def collect(self) -> Iterator[Metric]:
        pipeline = self.pipeline
        yield GaugeMetricFamily(
            "segserve_queue_depth",
            "Requests admitted and not yet answered (bounded by SEGSERVE_MAX_QUEUE).",
            value=pipeline.in_flight,
        )
        yield GaugeMetricFamily(
            "segserve_queue_limit",
            "SEGSERVE_MAX_QUEUE: requests beyond it are refused.",
            value=pipeline.settings.max_queue,
        )
        yield GaugeMetricFamily(
            "segserve_upload_bytes_in_flight",
            "Bytes of SegmentUpload chunks held by calls in progress (bounded by SEGSERVE_UPLOAD_BUDGET_BYTES).",
            value=pipeline.uploads.in_flight,
        )
        yield GaugeMetricFamily(
            "segserve_upload_budget_bytes",
            "SEGSERVE_UPLOAD_BUDGET_BYTES: a chunk that would pass it is refused.",
            value=pipeline.uploads.limit,
        )
        yield GaugeMetricFamily(
            "segserve_streams_open", "SegmentStream calls in progress.", value=pipeline.streams.open_streams
        )
        yield GaugeMetricFamily(
            "segserve_stream_responses_unsent",
            "SegmentStream responses made and not yet sent, because their callers read slowly; each holds a "
            "place in its stream's window.",
            value=pipeline.streams.unsent_responses,
        )
        stream_bytes = pipeline.stream_bytes
        yield GaugeMetricFamily(
            "segserve_stream_bytes_held",
            "Bytes held for streams (SegmentStream, ModelStreamInfer) and HTTP responses being sent: requests read "
            "and not yet answered, responses not yet sent (bounded by SEGSERVE_STREAM_BUDGET_BYTES).",
            value=stream_bytes.held,
        )
        yield GaugeMetricFamily(
            "segserve_stream_budget_bytes",
            "SEGSERVE_STREAM_BUDGET_BYTES: past it, streams that hold something stop reading and new stream "
            "requests are refused.",
            value=stream_bytes.limit,
        )
        yield GaugeMetricFamily(
            "segserve_stream_max_bytes",
            "SEGSERVE_STREAM_MAX_BYTES: past it, one stream stops reading until its caller reads.",
            value=stream_bytes.per_stream,
        )
        yield GaugeMetricFamily(
            "segserve_streams_paused",
            "Streams not reading their next request because of a byte cap, until responses are read.",
            value=stream_bytes.paused,
        )
        counts = pipeline.batch_size_counts
        buckets = []
        running = 0
        for size, count in enumerate(counts, start=1):
            running += count
            buckets.append((str(size), float(running)))
        buckets.append(("+Inf", float(running)))
        yield HistogramMetricFamily(
            "segserve_batch_size",
            "Images per model batch.",
            buckets=buckets,
            sum_value=float(sum(size * count for size, count in enumerate(counts, start=1))),
        )
        yield from self._per_model()

    def _per_model(self) -> Iterator[Metric]:
        pipeline = self.pipeline
        info = GaugeMetricFamily(
            "segserve_model_info",
            "Each configured model, by the name requests use (value 1 when ready, 0 otherwise).",
            labels=["model", "architecture", "weights", "device", "runtime", "max_size", "max_batch_size", "state"],
        )
        resident = GaugeMetricFamily(
            "segserve_model_resident_bytes",
            "What loading each model added to the process's resident memory (measured at load).",
            labels=["model"],
        )
        in_flight = GaugeMetricFamily(
            "segserve_model_requests_in_flight", "Requests being served by each model.", labels=["model"]
        )
        batches = GaugeMetricFamily(
            "segserve_model_batches", "Model batches run, by model and batch size.", labels=["model", "size"]
        )
        for model in pipeline.models.loaded():
            runtime, s = model.runtime, model.settings
            info.add_metric(
                [
                    model.name,
                    model.config.architecture,
                    without_server_paths(runtime.facts.weights_description) if runtime else "loading",
                    runtime.device_name if runtime else "loading",
                    runtime.description if runtime else "loading",
                    str(s.max_size),
                    str(s.max_batch_size),
                    model.state,
                ],
                1.0 if model.state == ModelState.READY else 0.0,
            )
            resident.add_metric([model.name], float(model.resident_bytes))
            in_flight.add_metric([model.name], float(model.in_flight))
            for size, count in enumerate(model.batch_size_counts, start=1):
                if count:
                    batches.add_metric([model.name, str(size)], float(count))
        yield from (info, resident, in_flight, batches)


class Metrics:
    """The per-request instruments and their registry."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        # process_resident_memory_bytes, open fds, CPU seconds, Python GC: what memory and leak alerts need.
        ProcessCollector(registry=self.registry)
        self.registry.register(GC_COLLECTOR)
        self.registry.register(PLATFORM_COLLECTOR)
        self.requests = Counter(
            "segserve_requests",
            "Finished gRPC calls by method and status code.",
            ["method", "code"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "segserve_request_seconds",
            "Time from a call's arrival to its answer, by method.",
            ["method"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.in_progress = Gauge(
            "segserve_requests_in_progress", "gRPC calls being handled, by method.", ["method"], registry=self.registry
        )
        self.protocol_requests = Counter(
            "segserve_protocol_requests",
            "Finished calls by protocol (segmenter-grpc, inference-grpc, inference-http, segment-http, other-grpc, "
            "other-http) and status code (gRPC code names on every protocol).",
            ["protocol", "code"],
            registry=self.registry,
        )
        self.images = Counter(
            "segserve_images",
            "Images answered (stream items included) by status code.",
            ["code"],
            registry=self.registry,
        )
        self.model_images = Counter(
            "segserve_model_images",
            "Images answered by each model (stream items included), by status code.",
            ["model", "code"],
            registry=self.registry,
        )
        self.stage = Histogram(
            "segserve_stage_seconds",
            "Per image: preprocess (decode, resize), queue (waiting for the model), inference (the model time "
            "of the batch the image ran in), postprocess (upsample, PNG).",
            ["stage"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.endpoint: MetricsEndpoint | None = None

    def watch(self, pipeline: SegmentationPipeline) -> None:
        self.registry.register(PipelineCollector(pipeline))

    def serve(
        self, host: str, port: int, tls: ssl.SSLContext | None = None, header_timeout_s: float = 10.0
    ) -> int | None:
        """Binds the /metrics port now and returns it (0 picks a free one); None when off (-1) or when the port
        cannot be bound. `start()` then serves it, on the server's event loop."""
        if port == METRICS_DISABLED:
            return None
        try:
            sock = listening_socket(host, port)
        except OSError as exc:
            # Serving matters more than being watched: say so loudly (the scrape target shows down) and go on.
            log.error("metrics endpoint not started on %s:%d: %s; serving without it", host, port, exc)
            return None
        self.endpoint = MetricsEndpoint(self.registry, sock, tls, header_timeout_s)
        return self.endpoint.port

    async def start(self) -> None:
        if self.endpoint is not None:
            await self.endpoint.start()

    def close(self) -> None:
        if self.endpoint is not None:
            self.endpoint.close()
            self.endpoint = None


def listening_socket(host: str, port: int) -> socket.socket:
    """A listening socket on the gRPC bind address ("[::]" takes IPv4 too, as gRPC's does). Listening at once
    claims the port now, so a taken port is known when the app is built."""
    address = host.strip("[]")
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        sock.bind((address, port))
        sock.listen(LISTEN_BACKLOG)
    except OSError:
        sock.close()
        raise
    return sock


def tls_context(cert: str | None, key: str | None, client_ca: str | None) -> ssl.SSLContext | None:
    """The server's TLS for the metrics port: its certificate, and with a client CA, client certificates
    required, as on the gRPC and HTTP ports. None without a certificate (plaintext, as the other ports)."""
    if not (cert and key):
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    if client_ca:
        context.load_verify_locations(client_ca)
        context.verify_mode = ssl.CERT_REQUIRED
    return context


class MetricsEndpoint:
    """/metrics on the server's event loop: one task per connection, not one thread (prometheus_client's
    start_http_server spent a thread on every connection, idle ones too, which counts against a pod's PID
    limit), with the bounds of the HTTP port: a request head must arrive within the head timeout (the TLS
    handshake too), at most METRICS_MAX_CONNECTIONS connections at once, one request per connection.
    The answer is prometheus_client's own WSGI app over the same registry, so names, formats (text and
    OpenMetrics by Accept), gzip and `name[]` filtering are exactly those of start_http_server; it runs on one
    scrape thread, since collecting reads /proc and formats every metric (not the event loop's work)."""

    def __init__(self, registry: CollectorRegistry, sock: socket.socket, tls: ssl.SSLContext | None, timeout: float):
        self.socket = sock
        self.port: int = sock.getsockname()[1]
        self.tls = tls
        self.timeout = timeout
        self.app = make_wsgi_app(registry)
        self.connections: set[asyncio.StreamWriter] = set()
        self.scrapes = ThreadPoolExecutor(max_workers=1, thread_name_prefix="metrics")
        self.server: asyncio.Server | None = None

    async def start(self) -> None:
        self.server = await asyncio.start_server(
            self._serve_connection,
            sock=self.socket,
            ssl=self.tls,
            ssl_handshake_timeout=self.timeout if self.tls else None,
            limit=MAX_HEAD_BYTES,
        )
        scheme = "https" if self.tls else "http"
        log.info("metrics on %s://%s:%d/metrics", scheme, self.socket.getsockname()[0], self.port)

    def close(self) -> None:
        """Stops listening and closes every connection; a scrape under way is cut short."""
        if self.server is not None:
            self.server.close()
            self.server = None
        else:
            self.socket.close()
        for writer in list(self.connections):
            writer.close()
        self.scrapes.shutdown(wait=False, cancel_futures=True)

    async def _serve_connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if len(self.connections) >= METRICS_MAX_CONNECTIONS:
            writer.write(_answer("503 Service Unavailable", [("Retry-After", "1")], b"too many connections\n"))
            writer.close()
            return
        self.connections.add(writer)
        try:
            try:
                head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), self.timeout)
            except TimeoutError:
                writer.write(_answer("408 Request Timeout", [], b"the request head did not arrive in time\n"))
                return
            except asyncio.LimitOverrunError:
                writer.write(_answer("431 Request Header Fields Too Large", [], b""))
                return
            except (asyncio.IncompleteReadError, ConnectionError, ssl.SSLError):
                return  # the caller left
            status, headers, body = await self._scrape(head)
            writer.write(_answer(status, headers, body))
            await asyncio.wait_for(writer.drain(), self.timeout)  # a caller that does not read is let go
        except (TimeoutError, ConnectionError, ssl.SSLError):
            pass
        finally:
            self.connections.discard(writer)
            writer.close()

    async def _scrape(self, head: bytes) -> tuple[str, list[tuple[str, str]], bytes]:
        try:
            request_line, *lines = head.decode("latin-1").split("\r\n")
            method, target, _version = request_line.split(" ")
        except ValueError:
            return "400 Bad Request", [], b"not an HTTP request\n"
        path, _, query = target.partition("?")
        environ: dict[str, Any] = {"REQUEST_METHOD": method, "PATH_INFO": unquote(path), "QUERY_STRING": query}
        for line in lines:
            name, _, value = line.partition(":")
            if name:
                environ["HTTP_" + name.strip().upper().replace("-", "_")] = value.strip()
        answered: list[Any] = []

        def scrape() -> bytes:
            return b"".join(self.app(environ, lambda status, headers: answered.extend((status, headers))))

        body = await asyncio.get_running_loop().run_in_executor(self.scrapes, scrape)
        status, headers = answered
        return status, headers, body


def _answer(status: str, headers: list[tuple[str, str]], body: bytes) -> bytes:
    head = [f"HTTP/1.1 {status}", *(f"{name}: {value}" for name, value in headers)]
    head += [f"Content-Length: {len(body)}", "Connection: close", "", ""]
    return "\r\n".join(head).encode("latin-1") + body
