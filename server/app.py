"""Builds the gRPC server (Segmenter, health, reflection) and runs it until a signal."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import time
from dataclasses import dataclass, field

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer  # health.aio, spelled so type checkers find it
from grpc_reflection.v1alpha import reflection

from protos.inference import grpc_predict_v2_pb2_grpc as inference_pb_grpc
from protos.segserve.v1 import segserve_pb2 as pb
from protos.segserve.v1 import segserve_pb2_grpc as pb_grpc
from server.core.pipeline import SegmentationPipeline
from server.dataplane import DataPlane
from server.errors import ModelLoadError
from server.grpc import inference as inference_grpc
from server.grpc.interceptor import ObservingInterceptor
from server.grpc.segmenter import SegmenterServicer
from server.models.registry import ModelState
from server.operations import tracing
from server.operations.drain import CallTracker
from server.operations.metrics import Metrics, tls_context
from server.rest.routes import build_app
from server.rest.server import HttpServer, create_http_server
from server.settings import Settings

log = logging.getLogger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Segmenter"].full_name
SERVED_SERVICES = (SERVICE_NAME, inference_grpc.SERVICE_NAME)
HANDLED_SIGNALS = (signal.SIGINT, signal.SIGTERM)
MODEL_HEALTH_PREFIX = "model/"
"""Each model's own health service name, "model/NAME": SERVING when it serves, NOT_SERVING when it is missing."""
MAX_RESPONSE_BYTES = 256 * 1024 * 1024
# What gRPC's own stop still waits for once the drain has settled: health watches, and a refusal or two
# from callers that ignore health.
FINAL_STOP_GRACE_S = 1.0


@dataclass
class App:
    server: grpc.aio.Server
    port: int
    pipeline: SegmentationPipeline
    health: HealthServicer
    metrics: Metrics | None = None
    metrics_port: int | None = None
    calls: CallTracker = field(default_factory=CallTracker)
    http: HttpServer | None = None

    @property
    def http_port(self) -> int | None:
        return self.http.port if self.http else None

    async def start(self) -> None:
        """Starts answering at once (health NOT_SERVING), then loads and warms the model, then SERVING."""
        await self.server.start()
        if self.metrics is not None:
            await self.metrics.start()
        if self.http is not None:
            await self.http.start()
        log.info("listening on port %d; loading model", self.port)
        await self.pipeline.start()
        await self.set_model_health()
        await self._set_health(health_pb2.HealthCheckResponse.SERVING)

    async def set_model_health(self) -> None:
        for entry in self.pipeline.models.entries():
            serving = entry.state == ModelState.READY and not self.pipeline.draining
            status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
            await self.health.set(MODEL_HEALTH_PREFIX + entry.name, status)

    async def stop(self, grace: float | None = None) -> None:
        """Drains, then stops. NOT_SERVING first, so balancers and health-watching clients stop sending;
        new calls are refused with UNAVAILABLE (clients retry them elsewhere) while admitted ones finish;
        gRPC itself stops only once callers have stopped arriving, since stopping it earlier would cancel
        calls it had taken in but not yet handed over. The grace period bounds the whole drain."""
        grace = self.pipeline.settings.grace_period_s if grace is None else grace
        started = time.monotonic()
        deadline = started + grace
        self.pipeline.draining = True
        await self.health.enter_graceful_shutdown()
        log.info("draining: %d calls in progress (grace %.1fs)", self.calls.active, grace)
        settled = await self.calls.settled(deadline)
        left = self.calls.active
        log.info(
            "drained in %.2fs%s", time.monotonic() - started, "" if settled else f"; cancelling {left} calls still open"
        )
        final_grace = max(0.0, min(deadline - time.monotonic(), FINAL_STOP_GRACE_S))
        http_stopped = asyncio.create_task(self.http.stop()) if self.http else None
        await self.server.stop(final_grace)
        if http_stopped is not None:
            await http_stopped
        await self.pipeline.close()
        if self.metrics is not None:
            self.metrics.close()

    async def _set_health(self, status: health_pb2.HealthCheckResponse.ServingStatus.ValueType) -> None:
        for service in ("", *SERVED_SERVICES):
            await self.health.set(service, status)


def server_options(settings: Settings) -> list[tuple[str, int]]:
    options = [
        ("grpc.max_receive_message_length", settings.max_message_bytes),
        # Masks and overlays can be larger than the image sent; the client accepts the same.
        ("grpc.max_send_message_length", MAX_RESPONSE_BYTES),
    ]
    if settings.http2_window_bytes > 0:
        # What a call's caller sends before the server reads it sits in gRPC's receive buffers, counted
        # nowhere. With BDP probing on, gRPC grows every call's window to megabytes while its memory
        # pressure is low, so a stalled stream takes in all of its requests and each slow upload parks
        # megabytes (docs/operations.md, 'Where a stalled stream's memory went'). A fixed window keeps
        # that to this many bytes per call.
        options += [
            ("grpc.http2.bdp_probe", 0),
            ("grpc.http2.lookahead_bytes", settings.http2_window_bytes),
        ]
    if settings.max_connection_age_s > 0:
        # HTTP/2 connections outlive scale-ups; a GOAWAY now and then makes clients re-resolve and
        # reconnect, so new replicas get their share (gRPC adds +-10% jitter against reconnect storms).
        options += [
            ("grpc.max_connection_age_ms", int(settings.max_connection_age_s * 1000)),
            ("grpc.max_connection_age_grace_ms", int(settings.max_connection_age_grace_s * 1000)),
        ]
    return options


def _read(path: str) -> bytes:
    with open(path, "rb") as file:
        return file.read()


def server_credentials(settings: Settings) -> grpc.ServerCredentials | None:
    """TLS when a certificate is set; client certificates required when a client CA is set too."""
    if not (settings.tls_cert and settings.tls_key):
        return None
    client_ca = _read(settings.tls_client_ca) if settings.tls_client_ca else None
    return grpc.ssl_server_credentials(
        [(_read(settings.tls_key), _read(settings.tls_cert))],
        root_certificates=client_ca,
        require_client_auth=client_ca is not None,
    )


async def create_app(settings: Settings, pipeline: SegmentationPipeline | None = None) -> App:
    """Builds everything and binds the port (0 picks a free one), without starting. Call inside the event loop."""
    pipeline = pipeline or SegmentationPipeline(settings)
    metrics = Metrics()
    metrics.watch(pipeline)
    calls = CallTracker()
    server = grpc.aio.server(options=server_options(settings), interceptors=[ObservingInterceptor(metrics, calls)])
    control = pipeline.model_control()
    plane = DataPlane(pipeline, control)
    pb_grpc.add_SegmenterServicer_to_server(SegmenterServicer(plane), server)
    inference_pb_grpc.add_GRPCInferenceServiceServicer_to_server(inference_grpc.InferenceServicer(plane), server)
    health_servicer = HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    for service in ("", *SERVED_SERVICES):
        await health_servicer.set(service, health_pb2.HealthCheckResponse.NOT_SERVING)
    reflection.enable_server_reflection(
        (*SERVED_SERVICES, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME),
        server,
    )
    address = f"{settings.host}:{settings.port}"
    credentials = server_credentials(settings)
    port = server.add_secure_port(address, credentials) if credentials else server.add_insecure_port(address)
    metrics_tls = tls_context(settings.tls_cert, settings.tls_key, settings.tls_client_ca)
    metrics_port = metrics.serve(settings.host, settings.metrics_port, metrics_tls, settings.http_header_timeout_s)
    http = create_http_server(build_app(plane, metrics, calls), settings)
    app = App(server, port, pipeline, health_servicer, metrics, metrics_port, calls, http)
    control.on_change = app.set_model_health
    return app


async def serve(settings: Settings) -> int:
    """Runs until SIGINT or SIGTERM; returns the process exit code. Tracing is set up from the OTEL_ environment
    first (server/operations/tracing.py), since the doors and models ask whether it is on when they are built;
    the spans still buffered are exported at the end."""
    try:
        tracing.configure()
    except tracing.TracingSettingsError as exc:
        log.error("cannot start: %s", exc)
        return 2
    try:
        return await _serve(settings)
    finally:
        tracing.shutdown()


async def _serve(settings: Settings) -> int:
    app = await create_app(settings)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()

    def on_signal(sig: signal.Signals) -> None:
        if not stop.is_set():  # the count shows an operator (and the drain test) what the signal found to finish
            log.info("%s received; requests in flight: %d", sig.name, app.pipeline.in_flight)
        stop.set()

    for sig in HANDLED_SIGNALS:
        loop.add_signal_handler(sig, on_signal, sig)
    starting = asyncio.create_task(app.start())
    stopping = asyncio.create_task(stop.wait())
    await asyncio.wait({starting, stopping}, return_when=asyncio.FIRST_COMPLETED)
    code = 0
    if starting.done() and (exc := starting.exception()) is not None:
        if isinstance(exc, ModelLoadError):
            log.error("cannot start: %s", exc)
        else:
            log.error("cannot start", exc_info=exc)
        code = 1
    else:
        await stopping
    log.info("shutting down (grace %.1fs)", settings.grace_period_s)
    starting.cancel()
    with contextlib.suppress(asyncio.CancelledError, Exception):
        await starting
    await app.stop()
    log.info("stopped")
    return code
