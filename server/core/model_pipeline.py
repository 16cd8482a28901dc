"""One served model: its runtime, batcher, labels and warm-up, over the worker pools every model shares.

decode + resize (worker pool) -> this model's batcher -> its runtime (one thread per instance)
-> upsample + PNG (worker pool). Each model has its own batcher, so batches never mix models. The runtime
is built by the factory it is handed (server.runtimes.factory.create_runtime unless a test gives another).

Spans (OpenTelemetry's API only; tracing is set up by server/operations/tracing.py): each image is a
"segment image" span holding "decode and resize", the batcher's "queue" and "batch", and "postprocess"
(and "overlay"); a start is "start model" with "build runtime" (its phases as events) and "warm up". Whether
tracing is on is asked once, when the model is built: off, the request path does no span work at all.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import time
from collections.abc import Callable
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from typing import Any, ParamSpec, TypeVar

import numpy as np
from opentelemetry import trace
from opentelemetry.util.types import AttributeValue
from PIL import Image

from server.core.allocator import give_back_freed_memory
from server.core.batch_sizing import BatchSizer
from server.core.batcher import Batcher
from server.core.imaging import Limits, decode_full_image, decode_image, image_from_pixels
from server.core.mask_png import mask_png_and_shares
from server.core.memory import resident_bytes
from server.core.postprocess import (
    ClassShare,
    blend_overlay,
    class_shares,
    class_shares_of_upsampled,
    encode_mask_png,
    encode_png,
    upsample_labels,
)
from server.core.statistics import ModelStatistics
from server.core.thread_names import RUNTIME, os_thread_named
from server.core.types import ResolvedOptions, SegmentOptions, SegmentResult, Timing
from server.errors import InvalidOptions, ModelLoadError
from server.labels import Label, palette_of
from server.models.registry import ModelState
from server.models.repository import ModelConfig
from server.runtimes import progress
from server.runtimes.base import Runtime
from server.runtimes.factory import create_runtime
from server.settings import MIN_MAX_SIZE, ModelSettings

log = logging.getLogger(__name__)

T = TypeVar("T")
P = ParamSpec("P")

DEFAULT_OVERLAY_OPACITY = 0.5

RuntimeFactory = Callable[[ModelSettings, tuple[Label, ...]], Runtime]
"""Builds a model's runtime from its settings and labels (create_runtime; tests hand in a gated one)."""


def _shape_of(array: np.ndarray) -> tuple[int, ...]:
    return tuple(array.shape)


def tracer_if_on() -> trace.Tracer | None:
    """The core's tracer when an SDK tracer provider is set; None when only the API's no-op is there (tracing
    off), so that the request path skips span work altogether instead of making no-op spans."""
    provider = trace.get_tracer_provider()
    if isinstance(provider, trace.ProxyTracerProvider | trace.NoOpTracerProvider):
        return None
    return provider.get_tracer("segserve.core")


def _span(
    tracer: trace.Tracer | None, name: str, **attributes: AttributeValue
) -> contextlib.AbstractContextManager[Any]:
    """A span current for the block, or nothing when tracing is off."""
    if tracer is None:
        return contextlib.nullcontext()
    return tracer.start_as_current_span(name, attributes=attributes)


@dataclass(frozen=True)
class Workers:
    """What every model's requests share: decoding and encoding threads, the overlay thread, the image limits."""

    pool: ThreadPoolExecutor
    overlay_pool: ThreadPoolExecutor
    limits: Limits


def _settled_resident_bytes() -> int:
    """Resident memory with what was freed handed back first, so that both ends of a load's measurement
    count only what is held: auto drops the candidates it did not pick (hundreds of megabytes of graphs and
    sessions), and handing those pages back after the load alone would also return pages freed before it,
    and make the load look free."""
    gc.collect()
    give_back_freed_memory(force=True)
    return resident_bytes()


class ModelPipeline:
    """One model: its runtime, batcher, labels and warm-up, over the shared workers. States as Triton names
    them: LOADING, READY, UNLOADING, UNAVAILABLE (failed to load, with `reason`)."""

    def __init__(
        self,
        config: ModelConfig,
        settings: ModelSettings,
        workers: Workers,
        runtime: Runtime | None = None,
        runtime_factory: RuntimeFactory = create_runtime,
        loader: Executor | None = None,
    ) -> None:
        self.config = config
        self.name = config.name
        self.settings = settings
        """Its own: architecture, weights, runtime, max_size, batching (the server's, with its config's overrides)."""
        self.workers = workers
        self.runtime = runtime
        self._runtime_factory = runtime_factory
        self._loader = loader
        """Where its load runs: the load worker for a load at run time, the shared pool at start-up (None)."""
        self.labels: tuple[Label, ...] = config.labels
        self.palette = palette_of(config.labels)
        self._batcher: Batcher[np.ndarray, np.ndarray] | None = None
        self.state = ModelState.LOADING
        self.reason = ""
        self.in_flight = 0
        """Requests that named this model and are not answered yet (an unload waits for them)."""
        self.resident_bytes = 0
        """What loading it added to the process's resident memory (runtime, graph, warm-up), measured."""
        self._idle: asyncio.Event | None = None
        self.statistics = ModelStatistics()
        """Requests, images and batches, as Triton's statistics extension counts them (every door's)."""
        self._batch_counts: list[int] | None = None
        """The batches it served, kept once it is closed."""
        self._tracer = tracer_if_on()
        self._load_span: trace.Span | None = None

    def _note_phase(self, phase: str) -> None:
        """What the load is doing, as the reason of a model LOADING (set from the load's thread), and an event
        of its span."""
        self.reason = phase
        if self._load_span is not None:
            self._load_span.add_event(phase)

    def _build_runtime(self) -> Runtime:
        with progress.reporting_to(self._note_phase), os_thread_named(RUNTIME):
            return self._runtime_factory(self.settings, self.config.labels)

    async def start(self) -> None:
        """Load the model (unless one was given) and warm it up, off the event loop. Raises ModelLoadError."""
        with _span(self._tracer, "start model", **{"segserve.model": self.name}):
            await self._start()

    async def _start(self) -> None:
        loop = asyncio.get_running_loop()
        loader = self._loader or self.workers.pool
        self.reason = "starting"
        before = await loop.run_in_executor(loader, _settled_resident_bytes)
        try:
            if self.runtime is None:
                with _span(self._tracer, "build runtime") as span:
                    self._load_span = span
                    try:
                        self.runtime = await loop.run_in_executor(loader, self._build_runtime)
                    finally:
                        self._load_span = None
            runtime = self.runtime
            self._batcher = Batcher(
                runtime.predict,
                _shape_of,
                max_batch_size=self.settings.max_batch_size,
                max_delay_s=self.settings.max_batch_delay_ms / 1000,
                sizer=BatchSizer(self.settings.max_batch_size) if self.settings.adaptive_batching else None,
                instances=self.settings.model_instances,
                on_batch=self.statistics.executed,
                tracer=self._tracer,
                span_attributes={"segserve.model": self.name, "segserve.runtime": runtime.description},
            )
            if self.settings.warmup:
                self.reason = "warming up"
                with _span(self._tracer, "warm up"):
                    await loop.run_in_executor(loader, self._warm_up)
        except ModelLoadError as exc:
            self.state, self.reason = ModelState.UNAVAILABLE, exc.message
            if not self.config.source:
                raise
            # One sentence naming the file and the field the problem came from.
            about_weights = exc.message.startswith(("weights file", "pretrained"))
            self.reason = f"{self.config.where('weights') if about_weights else self.config.source}: {exc.message}"
            raise ModelLoadError(self.reason) from exc
        self.resident_bytes = max(0, await loop.run_in_executor(loader, _settled_resident_bytes) - before)
        self.state, self.reason = ModelState.READY, ""
        log.info(
            "model %s (%s) ready on %s with %s (weights: %s; %d classes; %.0f MiB resident)",
            self.name,
            runtime.facts.model_name,
            runtime.device_name,
            runtime.description,
            runtime.facts.weights_description,
            len(self.labels),
            self.resident_bytes / 2**20,
        )

    def _warm_up(self) -> None:
        """One pass per expected shape (4:3 landscape and portrait, square), so first callers don't pay for it."""
        assert self.runtime is not None
        side = self.settings.max_size
        started = time.monotonic()
        # A runtime that starts its threads on first use (OpenVINO's) names them after this one.
        with os_thread_named(RUNTIME):
            for width, height in {(side, side * 3 // 4), (side * 3 // 4, side), (side, side)}:
                for _ in range(self.settings.model_instances):  # each instance pays its own first call of a shape
                    self.runtime.predict([np.zeros((height, width, 3), dtype=np.uint8)])
        log.info("warm-up of %s done in %.0f ms", self.name, (time.monotonic() - started) * 1000)

    def became_idle(self) -> None:
        if self._idle is not None:
            self._idle.set()

    async def wait_idle(self) -> None:
        """Until no request holds this model (the registry's acquire counts them)."""
        while self.in_flight:
            self._idle = asyncio.Event()
            await self._idle.wait()

    async def close(self) -> None:
        """Stops its batcher and lets go of its runtime, then hands the freed memory back to the system: glibc
        keeps what a runtime's arenas and graph freed for reuse, and without a trim the process stayed tens of
        MiB above its size before the model until some later large free happened to trim it (docs/operations.md,
        'Several models')."""
        self.state = ModelState.UNAVAILABLE
        if self._batcher is not None:
            await self._batcher.close()
            self._batch_counts = list(self._batcher.batch_size_counts)
            self._batcher = None
        self.runtime = None
        await asyncio.get_running_loop().run_in_executor(self.workers.pool, _settled_resident_bytes)

    @property
    def batch_size_counts(self) -> list[int]:
        if self._batcher is not None:
            return list(self._batcher.batch_size_counts)
        return self._batch_counts or [0] * self.settings.max_batch_size

    def resolve(self, options: SegmentOptions) -> ResolvedOptions:
        """The options as this model runs them; InvalidOptions for one it could never serve (an opacity out of
        range is refused even without an overlay: the caller asked for something that means nothing)."""
        if options.max_size == 0:
            max_size = self.settings.max_size
        elif options.max_size < MIN_MAX_SIZE:
            raise InvalidOptions(
                f"max_size must be 0 (server default) or at least {MIN_MAX_SIZE}, got {options.max_size}"
            )
        else:
            max_size = min(options.max_size, self.settings.max_size)
        opacity = DEFAULT_OVERLAY_OPACITY if options.overlay_opacity is None else options.overlay_opacity
        if not 0.0 <= opacity <= 1.0:
            raise InvalidOptions(f"overlay_opacity must be between 0 and 1, got {opacity}")
        return ResolvedOptions(max_size, opacity if options.overlay else None, options.mask_png, options.label_map)

    # ---- the request path -----------------------------------------------------------------

    async def segment(
        self, data: bytes | np.ndarray, options: ResolvedOptions, deadline: float | None
    ) -> SegmentResult:
        """One encoded image (or decoded RGB pixels, height x width x 3) through this model. The caller holds
        the model (ModelRegistry.acquire) and the request's queue place; `deadline` is a time.monotonic()
        value after which the batcher skips it."""
        if self._tracer is None:
            return await self._segment(data, options, deadline)
        with self._tracer.start_as_current_span("segment image", attributes={"segserve.model": self.name}) as span:
            result = await self._segment(data, options, deadline)
            span.set_attributes(
                {
                    "segserve.image.width": result.width,
                    "segserve.image.height": result.height,
                    "segserve.batch.size": result.timing.batch_size,
                }
            )
            return result

    async def _segment(
        self, data: bytes | np.ndarray, options: ResolvedOptions, deadline: float | None
    ) -> SegmentResult:
        assert self._batcher is not None
        tracer = self._tracer
        max_size, opacity = options.max_size, options.overlay_opacity
        limits = self.workers.limits
        started = time.monotonic()
        with self._batcher.expecting(), _span(tracer, "decode and resize"):
            # Never the full-size image here: it would sit in the batcher's queue for the whole wait
            # (150 MB at the pixel limit); overlays decode it again after the model (_render_overlay).
            if isinstance(data, np.ndarray):
                decoded = await self._in_pool(image_from_pixels, data, max_size, limits)
            else:
                decoded = await self._in_pool(decode_image, data, max_size, limits)
            model_input = np.asarray(decoded.model_input, dtype=np.uint8)
        preprocessed = time.monotonic()
        batch = await self._batcher.submit(model_input, deadline)
        inferred = time.monotonic()
        with _span(tracer, "postprocess"):
            mask_png, classes, label_map = await self._in_pool(
                self._postprocess, batch.output, decoded.original_size, options
            )
        overlay_png = None
        if opacity is not None:
            with _span(tracer, "overlay"):
                overlay_png = await asyncio.get_running_loop().run_in_executor(
                    self.workers.overlay_pool,
                    partial(self._render_overlay, batch.output, decoded.original_size, data, opacity),
                )
        finished = time.monotonic()
        timing = Timing(
            preprocess_ms=(preprocessed - started) * 1000,
            queue_ms=batch.queue_ms,
            inference_ms=batch.inference_ms,
            postprocess_ms=(finished - inferred) * 1000,
            total_ms=(finished - started) * 1000,
            batch_size=batch.batch_size,
        )
        width, height = decoded.original_size
        model_width, model_height = decoded.model_input.size
        return SegmentResult(
            width, height, model_width, model_height, mask_png, overlay_png, classes, timing, label_map, self.name
        )

    def _postprocess(
        self, labels: np.ndarray, size: tuple[int, int], options: ResolvedOptions
    ) -> tuple[bytes, list[ClassShare], np.ndarray | None]:
        if not (options.mask_png or options.label_map):
            return b"", class_shares_of_upsampled(labels, size, self.labels), None
        if not options.label_map:  # the PNG alone never needs the full-size mask in memory
            return *mask_png_and_shares(labels, size, self.palette, self.labels), None
        mask = upsample_labels(labels, size)
        mask_png = encode_mask_png(mask, self.palette) if options.mask_png else b""
        return mask_png, class_shares(mask, self.labels), np.asarray(mask)

    def _render_overlay(
        self, labels: np.ndarray, size: tuple[int, int], data: bytes | np.ndarray, opacity: float
    ) -> bytes:
        if isinstance(data, np.ndarray):
            full = Image.fromarray(np.ascontiguousarray(data, dtype=np.uint8))
        else:
            full = decode_full_image(data, self.workers.limits)
        return encode_png(blend_overlay(full, upsample_labels(labels, size), opacity, self.palette))

    async def _in_pool(self, fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        return await asyncio.get_running_loop().run_in_executor(self.workers.pool, partial(fn, *args, **kwargs))
