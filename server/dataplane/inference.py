"""The Open Inference Protocol's models over the pipeline: lookup by name and version, readiness, statistics,
the repository index and inference, with the same admission, batchers and statistics as Segment. Part of the
data plane (server/dataplane/plane.py is its one entry point for the doors)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import replace

from server.core.model_pipeline import ModelPipeline
from server.core.pipeline import SegmentationPipeline
from server.core.statistics import Duration
from server.core.types import SegmentResult
from server.dataplane.types import IndexEntry, StatisticDuration, StatisticsReport
from server.errors import UnknownModel
from server.inference.protocol import (
    MODEL_VERSION,
    InferRequest,
    InferResponse,
    ModelDescription,
    check_mask_sizes,
    images_of,
    options_of,
    output_tensor,
    requested_outputs,
)
from server.models.control import ModelControl
from server.models.registry import ModelState
from server.operations.access import note_result


@contextmanager
def counted_request(model: ModelPipeline, request_id: str) -> Iterator[list[SegmentResult]]:
    """One request, by whichever door: counted once in its model's statistics (failed if anything inside
    raises, refusals after the model lookup included), and each result the caller appends to the yielded list
    noted in the call's access record."""
    started = time.monotonic()
    answered: list[SegmentResult] = []
    try:
        yield answered
    except BaseException:
        model.statistics.failed(time.monotonic() - started)
        raise
    model.statistics.succeeded([result.timing for result in answered], time.monotonic() - started)
    for result in answered:
        note_result(request_id, result)


class InferenceModels:
    """The served models as the protocol sees them: each by its name, with its own statistics."""

    def __init__(self, pipeline: SegmentationPipeline, control: ModelControl[ModelPipeline] | None = None) -> None:
        self.pipeline = pipeline
        self.control = control or pipeline.model_control()

    @property
    def ready(self) -> bool:
        """The server's readiness: started (at least one model loaded) and not draining."""
        return self.pipeline.ready and not self.pipeline.draining

    def names(self) -> list[str]:
        return [model.name for model in self.pipeline.models.loaded()]

    def known(self, name: str, version: str = "") -> ModelPipeline:
        """The registry's lookup of `name` in any state (metadata and readiness are answered while it loads),
        plus the protocol's own rules: NOT_FOUND for a version the model does not have, and no default model
        (an empty name is NOT_FOUND whatever the default model's state: the protocol always names its model,
        so no retry can make that call right)."""
        models = self.pipeline.models
        if not name:
            ready = ", ".join(models.ready_names()) or "none yet"
            raise UnknownModel(f"unknown model '': the inference protocol names its model (loaded: {ready})")
        model = models.get(name, any_state=True)
        if version not in ("", MODEL_VERSION):
            raise UnknownModel(f"model {name!r} has no version {version!r}; its one version is {MODEL_VERSION!r}")
        return model

    def model_ready(self, model: ModelPipeline) -> bool:
        return self.ready and model.state == ModelState.READY

    def statistics_report(self, model: ModelPipeline) -> StatisticsReport:
        """Triton's ModelStatistics for one model. The counts are the model's, by every door, Segment's
        included (server/core/statistics.py says what each means)."""
        s = model.statistics

        def snapshot(d: Duration) -> StatisticDuration:
            return StatisticDuration(d.count, d.ns)

        return StatisticsReport(
            name=model.name,
            version=MODEL_VERSION,
            last_inference_ms=s.last_inference_ms,
            inference_count=s.inference_count,
            execution_count=s.execution_count,
            success=snapshot(s.success),
            fail=snapshot(s.fail),
            queue=snapshot(s.queue),
            compute_input=snapshot(s.compute_input),
            compute_infer=snapshot(s.compute_infer),
            compute_output=snapshot(s.compute_output),
            batches=tuple((size, snapshot(s.batches[size])) for size in sorted(s.batches)),
        )

    def every_statistics_report(self) -> list[StatisticsReport]:
        return [self.statistics_report(model) for model in self.pipeline.models.loaded()]

    def index(self, ready_only: bool = False) -> list[IndexEntry]:
        """The repository index; while draining every model reads UNAVAILABLE, "shutting down": none takes
        new requests, whichever door asks."""
        entries = self.pipeline.models.entries()
        if ready_only:
            entries = [e for e in entries if e.state == ModelState.READY]
        if self.pipeline.draining:
            return [IndexEntry(e.name, MODEL_VERSION, ModelState.UNAVAILABLE, "shutting down") for e in entries]
        return [IndexEntry(e.name, MODEL_VERSION, e.state, e.reason) for e in entries]

    def describe(self, model: ModelPipeline) -> ModelDescription:
        settings = model.settings
        return ModelDescription(
            name=model.name,
            labels=model.labels,
            max_batch_size=self.pipeline.settings.max_queue,
            preferred_batch_size=settings.max_batch_size,
            max_queue_delay_us=int(settings.max_batch_delay_ms * 1000),
        )

    # ---- inference ------------------------------------------------------------------------

    async def infer(
        self, request: InferRequest, deadline: float | None = None, admitted_before_drain: bool = False
    ) -> InferResponse:
        model = self.known(request.model_name, request.model_version)
        with counted_request(model, request.id) as answered:  # refused before any work, too: one failed request
            response = await self._infer(model.name, request, deadline, admitted_before_drain)
            answered.extend(response.results)
        return response

    async def _infer(
        self, name: str, request: InferRequest, deadline: float | None, admitted_before_drain: bool
    ) -> InferResponse:
        pipeline = self.pipeline
        # The batch size and shape against the queue limit before one image is built (images_of says why).
        images = images_of(request.inputs, pipeline.settings.max_queue)
        wanted = requested_outputs(request)
        options = replace(options_of(request.parameters, wanted), model=name)
        with ExitStack() as slots:
            # Held for the whole request: an unload waits for all of its images, never refuses the later ones.
            model = slots.enter_context(pipeline.models.acquire(name))
            resolved = model.resolve(options)
            if len(images) > 1:
                # Everything the headers can tell is checked before the request takes a place or a batch slot:
                # an image decoding would refuse, or sizes MASK cannot stack, never let the others reach the model.
                check_mask_sizes(wanted, await pipeline.image_sizes(images))
            # All N places or none: a request is admitted whole, like N Segment calls at once.
            for _ in images:
                slots.enter_context(pipeline.admit(admitted_before_drain=admitted_before_drain))
            tasks = [asyncio.ensure_future(model.segment(image, resolved, deadline)) for image in images]
            try:
                results = await asyncio.gather(*tasks)
            finally:  # one image failed (or the call was cancelled): the others stop before their places go back
                for task in tasks:
                    task.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
        outputs = [output_tensor(output, results) for output in wanted]
        return InferResponse(name, MODEL_VERSION, request.id, outputs, list(results))
