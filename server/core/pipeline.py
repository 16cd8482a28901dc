"""The transport-free core every front door calls: bytes, options and a model's name in, a result out.

SegmentationPipeline holds what all models share (the worker pools, the admission bound, the upload and
stream budgets) and finds each request's model in the registry (server/models/registry.py); each model is a
ModelPipeline (server/core/model_pipeline.py) with its own runtime and batcher.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from concurrent.futures import Executor, ThreadPoolExecutor
from functools import partial

import numpy as np

from server.core.admission import Admission, AdmissionSlot
from server.core.buffers import StreamCounts, UploadBudget
from server.core.imaging import Limits, image_size, let_pillow_accept
from server.core.load_worker import LoadWorker
from server.core.model_pipeline import ModelPipeline, RuntimeFactory, Workers
from server.core.stream_bytes import StreamBudget
from server.core.thread_names import OVERLAY, PREPOST, naming
from server.errors import ModelLoadError, NotReady, TooManyModels
from server.labels import Label
from server.models.control import ModelControl
from server.models.registry import ModelRegistry
from server.models.repository import BrokenModel, ModelConfig, configured_models, default_model_name
from server.runtimes.base import Runtime
from server.runtimes.factory import create_runtime
from server.settings import Settings

log = logging.getLogger(__name__)

OVERLAY_WORKERS = 1


class SegmentationPipeline:
    """Owns the worker pools, the admission bound and the models' registry. Create inside the server's event loop.
    `runtime`: a ready runtime for the default model (tests), instead of loading one; `runtime_factory`
    builds every other model's runtime (tests hand in a gated one)."""

    def __init__(
        self, settings: Settings, runtime: Runtime | None = None, runtime_factory: RuntimeFactory = create_runtime
    ) -> None:
        self.settings = settings
        self.limits = Limits(max_bytes=settings.max_image_bytes, max_pixels=settings.max_image_pixels)
        let_pillow_accept(settings.max_image_pixels)
        self._pool = ThreadPoolExecutor(
            max_workers=settings.worker_threads, thread_name_prefix="prepost", initializer=naming(PREPOST)
        )
        # Overlays are the one step that needs the full-size image (and a few full-size copies while
        # blending): one at a time bounds that memory whatever is queued, and small requests' decoding
        # and masks never wait behind seconds of overlay work in the shared pool.
        self._overlay_pool = ThreadPoolExecutor(
            max_workers=OVERLAY_WORKERS, thread_name_prefix="overlay", initializer=naming(OVERLAY)
        )
        self.workers = Workers(self._pool, self._overlay_pool, self.limits)
        # Loads at run time (model control) run here, never on the requests' pool (server/core/load_worker.py).
        self._load_worker = LoadWorker()
        self._given_runtime = runtime
        self._runtime_factory = runtime_factory
        self.models: ModelRegistry[ModelPipeline] = ModelRegistry()
        self.admission = Admission(settings.max_queue)
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
        # The model a given runtime is for (tests); which model is the default is known once one has loaded.
        first = default_model_name(self.settings, configs)
        if self.settings.default_model:
            self.models.name_default(self.settings.default_model, "named by SEGSERVE_DEFAULT_MODEL")
        errors: list[str] = []
        for config in configs:
            if isinstance(config, BrokenModel):
                self.models.add_broken(config.name, config.reason)
                log.error("model %s not loaded: %s", config.name, config.reason)
                errors.append(config.reason)
                continue
            given = self._given_runtime if config.name == first else None
            model = self.new_model(config, given)
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
                continue
            self.models.now_ready(model)
        if not self.models.ready_names():
            raise ModelLoadError(f"no model could be loaded: {'; '.join(errors)}")
        if len(configs) > 1:
            states = ", ".join(f"{e.name} {e.state}" for e in self.models.entries())
            log.info("models: %s (default: %s, %s)", states, self.models.default_name, self.models.default_reason)
        self.ready = True

    def new_model(
        self, config: ModelConfig, runtime: Runtime | None = None, loader: Executor | None = None
    ) -> ModelPipeline:
        """A model of the repository over the shared workers, not yet started. `loader`: where its load runs
        (None: the shared pool, as at start-up, when nothing is served yet)."""
        return ModelPipeline(
            config, config.settings_for(self.settings), self.workers, runtime, self._runtime_factory, loader
        )

    def model_control(self) -> ModelControl[ModelPipeline]:
        """Loading and unloading this pipeline's models at run time (SEGSERVE_MODEL_CONTROL), on the load worker."""
        return ModelControl(self.models, self.settings, partial(self.new_model, loader=self._load_worker))

    async def close(self) -> None:
        self.ready = False
        for model in self.models.loaded():
            await model.close()
        self._pool.shutdown(wait=False, cancel_futures=True)
        self._overlay_pool.shutdown(wait=False, cancel_futures=True)
        self._load_worker.shutdown(wait=False, cancel_futures=True)

    # ---- info -----------------------------------------------------------------------------

    @property
    def default_model(self) -> ModelPipeline | None:
        """The default model in whatever state (None when there is none yet, or it failed to load)."""
        return self.models.named(self.models.default_name)

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
        return self.admission.taken

    # ---- the request path -----------------------------------------------------------------

    async def image_sizes(self, images: Sequence[bytes | np.ndarray]) -> list[tuple[int, int]]:
        """Each image's (width, height) as decoding will find it, read from its header in the worker pool;
        refuses, before any decoding, an image decoding would refuse for its format or the limits."""
        limits = self.limits

        def sizes() -> list[tuple[int, int]]:
            return [image_size(image, limits) for image in images]

        return await asyncio.get_running_loop().run_in_executor(self._pool, sizes)

    def admit(self, *, admitted_before_drain: bool = False) -> AdmissionSlot:
        """A queue place, or the refusal a caller should hear now (shutting down, loading, queue full).
        `admitted_before_drain`: an image of a call that began before the drain (a stream's next frame),
        which the drain lets finish like any admitted call."""
        if self.draining and not admitted_before_drain:
            raise NotReady("server is shutting down; retry on another replica")
        if not self.ready:
            raise NotReady("model is still loading")
        return self.admission.take()
