"""The transport-free core: bytes, options and a model's name in, a segmentation result out.

decode + resize (worker pool) -> the model's batcher -> its model (one thread) -> upsample + PNG (worker pool)

SegmentationPipeline is what the front doors call: it holds what all models share (the worker pools, the
admission bound, the upload budget) and finds each request's model in the registry (server/registry.py).
Each model is a ModelPipeline with its own runtime, batcher, labels and warm-up, so batches never mix models.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from typing import ParamSpec, TypeVar

import numpy as np
from PIL import Image

from server.allocator import give_back_freed_memory
from server.batch_sizing import BatchSizer
from server.batcher import Batcher
from server.buffers import StreamCounts, UploadBudget
from server.errors import InvalidOptions, ModelLoadError, NotReady, Overloaded, TooManyModels
from server.imaging import Limits, decode_full_image, decode_image, image_from_pixels, let_pillow_accept
from server.labels import Label, palette_of
from server.mask_png import mask_png_at
from server.memory import resident_bytes
from server.postprocess import (
    ClassShare,
    blend_overlay,
    class_shares_of_upsampled,
    encode_mask_png,
    encode_png,
    upsample_labels,
)
from server.registry import ModelRegistry
from server.repository import BrokenModel, ModelConfig, configured_models, default_model_name
from server.runtimes import Runtime
from server.runtimes.factory import create_runtime
from server.settings import MIN_MAX_SIZE, Settings
from server.stream_bytes import StreamBudget

log = logging.getLogger(__name__)

T = TypeVar("T")
P = ParamSpec("P")

DEFAULT_OVERLAY_OPACITY = 0.5
OVERLAY_WORKERS = 1


@dataclass(frozen=True)
class SegmentOptions:
    max_size: int = 0
    """0: the server's default."""
    overlay: bool = False
    overlay_opacity: float | None = None
    mask_png: bool = True
    """False: skip encoding the mask PNG (SegmentResult.mask_png is empty)."""
    label_map: bool = False
    """True: also return the label map at the input's size (SegmentResult.label_map)."""
    model: str = ""
    """The model's name; empty: the default model."""


@dataclass(frozen=True)
class Timing:
    preprocess_ms: float = 0.0
    queue_ms: float = 0.0
    inference_ms: float = 0.0
    postprocess_ms: float = 0.0
    total_ms: float = 0.0
    batch_size: int = 0


@dataclass(frozen=True)
class SegmentResult:
    width: int
    height: int
    model_width: int
    model_height: int
    mask_png: bytes
    overlay_png: bytes | None
    classes: list[ClassShare]
    timing: Timing = field(default_factory=Timing)
    label_map: np.ndarray | None = None
    """uint8 class ids, height x width, when SegmentOptions.label_map asked for it."""
    model: str = ""
    """The name of the model that answered."""


def _shape_of(array: np.ndarray) -> tuple[int, ...]:
    return tuple(array.shape)


class AdmissionSlot:
    """One of SEGSERVE_MAX_QUEUE places. Held from admission until the answer is no longer the server's
    to keep: a unary answer returned, an upload's whole life (from its first chunk), a stream item
    until its response is sent. So the queue limit bounds every image the server holds, all models together."""

    def __init__(self, pipeline: SegmentationPipeline) -> None:
        self._pipeline: SegmentationPipeline | None = pipeline

    def release(self) -> None:
        if self._pipeline is not None:
            self._pipeline._admitted -= 1
            self._pipeline = None

    def __enter__(self) -> AdmissionSlot:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


@dataclass(frozen=True)
class Workers:
    """What every model's requests share: decoding and encoding threads, the overlay thread, the image limits."""

    pool: ThreadPoolExecutor
    overlay_pool: ThreadPoolExecutor
    limits: Limits


def overlay_opacity(options: SegmentOptions) -> float:
    opacity = DEFAULT_OVERLAY_OPACITY if options.overlay_opacity is None else options.overlay_opacity
    if not 0.0 <= opacity <= 1.0:
        raise InvalidOptions(f"overlay_opacity must be between 0 and 1, got {opacity}")
    return opacity


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
        self, config: ModelConfig, settings: Settings, workers: Workers, runtime: Runtime | None = None
    ) -> None:
        self.config = config
        self.name = config.name
        self.settings = settings
        """The server's settings with this model's architecture, weights, max_size and batching."""
        self.workers = workers
        self.runtime = runtime
        self.labels: tuple[Label, ...] = config.labels
        self.palette = palette_of(config.labels)
        self._batcher: Batcher[np.ndarray, np.ndarray] | None = None
        self.state = "LOADING"
        self.reason = ""
        self.in_flight = 0
        """Requests that named this model and are not answered yet (an unload waits for them)."""
        self.resident_bytes = 0
        """What loading it added to the process's resident memory (runtime, graph, warm-up), measured."""
        self._idle: asyncio.Event | None = None

    async def start(self) -> None:
        """Load the model (unless one was given) and warm it up, off the event loop. Raises ModelLoadError."""
        loop = asyncio.get_running_loop()
        before = await loop.run_in_executor(self.workers.pool, _settled_resident_bytes)
        try:
            if self.runtime is None:
                self.runtime = await loop.run_in_executor(
                    self.workers.pool, create_runtime, self.settings, self.config.labels
                )
            runtime = self.runtime
            self._batcher = Batcher(
                runtime.predict,
                _shape_of,
                max_batch_size=self.settings.max_batch_size,
                max_delay_s=self.settings.max_batch_delay_ms / 1000,
                sizer=BatchSizer(self.settings.max_batch_size) if self.settings.adaptive_batching else None,
                instances=self.settings.model_instances,
            )
            if self.settings.warmup:
                await loop.run_in_executor(self.workers.pool, self._warm_up)
        except ModelLoadError as exc:
            self.state, self.reason = "UNAVAILABLE", exc.message
            if not self.config.source:
                raise
            # One sentence naming the file and the field the problem came from.
            about_weights = exc.message.startswith(("weights file", "pretrained"))
            self.reason = f"{self.config.where('weights') if about_weights else self.config.source}: {exc.message}"
            raise ModelLoadError(self.reason) from exc
        self.resident_bytes = max(0, await loop.run_in_executor(self.workers.pool, _settled_resident_bytes) - before)
        self.state = "READY"
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
        self.state = "UNAVAILABLE"
        if self._batcher is not None:
            await self._batcher.close()

    @property
    def batch_size_counts(self) -> list[int]:
        return list(self._batcher.batch_size_counts) if self._batcher else [0] * self.settings.max_batch_size

    def effective_max_size(self, options: SegmentOptions) -> int:
        if options.max_size == 0:
            return self.settings.max_size
        if options.max_size < MIN_MAX_SIZE:
            raise InvalidOptions(
                f"max_size must be 0 (server default) or at least {MIN_MAX_SIZE}, got {options.max_size}"
            )
        return min(options.max_size, self.settings.max_size)

    def check_options(self, options: SegmentOptions) -> None:
        self.effective_max_size(options)
        overlay_opacity(options)

    # ---- the request path -----------------------------------------------------------------

    async def segment(self, data: bytes | np.ndarray, options: SegmentOptions, deadline: float | None) -> SegmentResult:
        assert self._batcher is not None
        max_size = self.effective_max_size(options)
        opacity = overlay_opacity(options)
        limits = self.workers.limits
        started = time.monotonic()
        with self._batcher.expecting():
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
        mask_png, classes, label_map = await self._in_pool(
            self._postprocess, batch.output, decoded.original_size, options
        )
        overlay_png = None
        if options.overlay:
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
        self, labels: np.ndarray, size: tuple[int, int], options: SegmentOptions
    ) -> tuple[bytes, list[ClassShare], np.ndarray | None]:
        shares = class_shares_of_upsampled(labels, size, self.labels)
        if not (options.mask_png or options.label_map):
            return b"", shares, None
        if not options.label_map:  # the PNG alone never needs the full-size mask in memory
            return mask_png_at(labels, size, self.palette), shares, None
        mask = upsample_labels(labels, size)
        mask_png = encode_mask_png(mask, self.palette) if options.mask_png else b""
        return mask_png, shares, np.asarray(mask)

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


class SegmentationPipeline:
    """Owns the worker pools, the admission bound and the models' registry. Create inside the server's event loop.
    `runtime`: a ready runtime for the default model (tests), instead of loading one."""

    def __init__(self, settings: Settings, runtime: Runtime | None = None) -> None:
        self.settings = settings
        self.limits = Limits(max_bytes=settings.max_image_bytes, max_pixels=settings.max_image_pixels)
        let_pillow_accept(settings.max_image_pixels)
        self._pool = ThreadPoolExecutor(max_workers=settings.worker_threads, thread_name_prefix="prepost")
        # Overlays are the one step that needs the full-size image (and a few full-size copies while
        # blending): one at a time bounds that memory whatever is queued, and small requests' decoding
        # and masks never wait behind seconds of overlay work in the shared pool.
        self._overlay_pool = ThreadPoolExecutor(max_workers=OVERLAY_WORKERS, thread_name_prefix="overlay")
        self.workers = Workers(self._pool, self._overlay_pool, self.limits)
        self._given_runtime = runtime
        self.models = ModelRegistry()
        self._admitted = 0
        self.uploads = UploadBudget(settings.upload_budget_bytes)
        self.streams = StreamCounts()
        self.stream_bytes = StreamBudget(settings.stream_budget_bytes, settings.stream_max_bytes)
        self.ready = False
        """True once start-up has loaded what it could (at least one model)."""
        self.draining = False
        """Set on shutdown: new requests are refused (UNAVAILABLE) while admitted ones finish."""

    # ---- lifecycle ------------------------------------------------------------------------

    async def start(self) -> None:
        """Load every configured model, one after another. A model that fails is logged and left out while the
        others serve; only when none loads does start-up fail (with the one model's own error when there is one)."""
        configs = configured_models(self.settings)
        self.models.default_name = default_model_name(self.settings, configs)
        errors: list[str] = []
        for config in configs:
            if isinstance(config, BrokenModel):
                self.models.add_broken(config.name, config.reason)
                log.error("model %s not loaded: %s", config.name, config.reason)
                errors.append(config.reason)
                continue
            given = self._given_runtime if config.name == self.models.default_name else None
            model = ModelPipeline(config, config.settings_for(self.settings), self.workers, given)
            try:
                self.models.check_room(config, self.settings)
            except TooManyModels as exc:
                self.models.add_broken(config.name, exc.message)
                log.error("model %s not loaded: %s", config.name, exc.message)
                errors.append(exc.message)
                continue
            self.models.add(model)
            try:
                await model.start()
            except ModelLoadError as exc:
                if len(configs) == 1:
                    raise
                log.error("model %s not loaded: %s", config.name, exc.message)
                errors.append(exc.message)
        if not self.models.ready_names():
            raise ModelLoadError(f"no model could be loaded: {'; '.join(errors)}")
        if len(configs) > 1:
            states = ", ".join(f"{e.name} {e.state}" for e in self.models.entries())
            log.info("models: %s (default: %s)", states, self.models.default_name)
        self.ready = True

    async def close(self) -> None:
        self.ready = False
        for model in self.models.loaded():
            await model.close()
        self._pool.shutdown(wait=False, cancel_futures=True)
        self._overlay_pool.shutdown(wait=False, cancel_futures=True)

    # ---- info -----------------------------------------------------------------------------

    @property
    def default_model(self) -> ModelPipeline | None:
        return self.models.find(self.models.default_name)

    @property
    def runtime(self) -> Runtime | None:
        """The default model's runtime (None while it loads)."""
        model = self.default_model
        return model.runtime if model else None

    @property
    def labels(self) -> tuple[Label, ...]:
        model = self.default_model
        if model is None or model.runtime is None:
            raise NotReady("model is still loading")
        return model.labels

    @property
    def batch_size_counts(self) -> list[int]:
        """Batches served by size, all models together."""
        counts = [0] * self.settings.max_batch_size
        for model in self.models.loaded():
            for size, count in enumerate(model.batch_size_counts):
                if size >= len(counts):
                    counts.append(0)
                counts[size] += count
        return counts

    @property
    def in_flight(self) -> int:
        return self._admitted

    # ---- the request path -----------------------------------------------------------------

    def check_options(self, options: SegmentOptions) -> None:
        """Refuses options a request could never be served with, its model's name among them, before its bytes."""
        self.models.get(options.model).check_options(options)

    def admit(self, *, admitted_before_drain: bool = False) -> AdmissionSlot:
        """A queue place, or the refusal a caller should hear now (shutting down, loading, queue full).
        `admitted_before_drain`: an image of a call that began before the drain (a stream's next frame),
        which the drain lets finish like any admitted call."""
        if self.draining and not admitted_before_drain:
            raise NotReady("server is shutting down; retry on another replica")
        if not self.ready:
            raise NotReady("model is still loading")
        if self._admitted >= self.settings.max_queue:
            raise Overloaded(
                f"server busy: {self._admitted} requests in progress (SEGSERVE_MAX_QUEUE={self.settings.max_queue})"
            )
        self._admitted += 1
        return AdmissionSlot(self)

    async def segment(
        self,
        data: bytes | np.ndarray,
        options: SegmentOptions,
        deadline: float | None = None,
        slot: AdmissionSlot | None = None,
        held: ModelPipeline | None = None,
    ) -> SegmentResult:
        """Segment one encoded image (or decoded RGB pixels, height x width x 3) with the model the options
        name. `deadline` is a time.monotonic() value after which the model skips it.

        Without `slot`, admits the request and frees its place on return; with one, the caller holds
        the place already and frees it itself. `held`: the model, acquired by the caller (models.acquire),
        so that an unload waits for the request from then on."""
        if held is not None:  # the caller acquired the model already (an upload, from its first chunk)
            return await self._segment(held, data, options, deadline, slot)
        with self.models.acquire(options.model) as model:
            return await self._segment(model, data, options, deadline, slot)

    async def _segment(
        self,
        model: ModelPipeline,
        data: bytes | np.ndarray,
        options: SegmentOptions,
        deadline: float | None,
        slot: AdmissionSlot | None,
    ) -> SegmentResult:
        model.check_options(options)
        if slot is not None:
            return await model.segment(data, options, deadline)
        with self.admit():
            return await model.segment(data, options, deadline)
