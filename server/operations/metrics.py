"""Prometheus metrics, one registry per app (several servers in one process never clash).

Per-request figures are counted by server.grpc.interceptor; the pipeline's state (queue depth, batch
sizes, model) is read at scrape time by a collector, so the request path carries no metric calls.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from typing import TYPE_CHECKING
from wsgiref.simple_server import WSGIServer

from prometheus_client import (
    GC_COLLECTOR,
    PLATFORM_COLLECTOR,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
    start_http_server,
)
from prometheus_client.core import GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from server.core.pipeline import SegmentationPipeline

log = logging.getLogger(__name__)

METRICS_DISABLED = -1

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
                    runtime.facts.weights_description if runtime else "loading",
                    runtime.device_name if runtime else "loading",
                    runtime.description if runtime else "loading",
                    str(s.max_size),
                    str(s.max_batch_size),
                    model.state,
                ],
                1.0 if model.state == "READY" else 0.0,
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
        self._http: WSGIServer | None = None
        self._http_thread: threading.Thread | None = None

    def watch(self, pipeline: SegmentationPipeline) -> None:
        self.registry.register(PipelineCollector(pipeline))

    def serve(self, host: str, port: int) -> int | None:
        """Starts the /metrics HTTP endpoint; returns its port (0 picks a free one), None when off (-1) or failed."""
        if port == METRICS_DISABLED:
            return None
        try:
            self._http, self._http_thread = start_http_server(port, addr=host.strip("[]"), registry=self.registry)
        except OSError as exc:
            # Serving matters more than being watched: say so loudly (the scrape target shows down) and go on.
            log.error("metrics endpoint not started on %s:%d: %s; serving without it", host, port, exc)
            return None
        bound = int(self._http.server_port)
        log.info("metrics on http://%s:%d/metrics", host, bound)
        return bound

    def close(self) -> None:
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None
