"""One model's cumulative statistics, with the meanings of Triton's statistics extension, for every door.

- a request: one Segment call (Segment, SegmentUpload, a SegmentStream frame, POST /v1/segment) or one
  ModelInfer (gRPC, HTTP, a ModelStreamInfer request), whatever its number of images;
- an inference: one image (`inference_count`, as Triton counts each element of a batched request);
- an execution: one batch through the model (`execution_count`; `batch_stats` by batch size).

success and fail: requests and their durations, from the moment the request named a known model to its
answer; a request refused before any work (a wrong tensor, a bad image header, a full queue) is a fail
and adds no inference and no execution. queue, compute_input (decode and resize), compute_infer (the
model) and compute_output (upsampling, PNG, overlay) count successful requests; for a request of several
images, which go through side by side, each is the mean of its images'.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from server.core.types import Timing


@dataclass
class Duration:
    """Triton's StatisticDuration: how many times, and their total in nanoseconds."""

    count: int = 0
    ns: int = 0

    def add(self, seconds: float) -> None:
        self.count += 1
        self.ns += max(0, round(seconds * 1e9))


@dataclass
class ModelStatistics:
    inference_count: int = 0
    execution_count: int = 0
    last_inference_ms: int = 0
    success: Duration = field(default_factory=Duration)
    fail: Duration = field(default_factory=Duration)
    queue: Duration = field(default_factory=Duration)
    compute_input: Duration = field(default_factory=Duration)
    compute_infer: Duration = field(default_factory=Duration)
    compute_output: Duration = field(default_factory=Duration)
    batches: dict[int, Duration] = field(default_factory=dict)
    """Batch size -> executions of that size and the model's time on them (batch_stats' compute_infer)."""

    def executed(self, batch_size: int, seconds: float) -> None:
        """One batch through the model (the batcher calls it)."""
        self.execution_count += 1
        self.batches.setdefault(batch_size, Duration()).add(seconds)

    def succeeded(self, timings: Sequence[Timing], seconds: float) -> None:
        """A request answered: its images' timings and its duration."""
        self.success.add(seconds)
        self.inference_count += len(timings)
        self.last_inference_ms = int(time.time() * 1000)
        if not timings:
            return
        n = len(timings)
        self.queue.add(sum(t.queue_ms for t in timings) / n / 1000)
        self.compute_input.add(sum(t.preprocess_ms for t in timings) / n / 1000)
        self.compute_infer.add(sum(t.inference_ms for t in timings) / n / 1000)
        self.compute_output.add(sum(t.postprocess_ms for t in timings) / n / 1000)

    def failed(self, seconds: float) -> None:
        """A request refused or failed, after how long."""
        self.fail.add(seconds)
        self.last_inference_ms = int(time.time() * 1000)
