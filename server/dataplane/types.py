"""The values the data plane takes and returns beside the core's own (server.core.types) and the protocol's
(server.inference.protocol): what a door converts to and from its messages, and nothing that runs."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from server.core.types import SegmentOptions
from server.labels import Label
from server.models.registry import ModelState


@dataclass(frozen=True)
class UploadChunk:
    """One chunk of an upload as a door parsed it. `request_id` and `options` belong on the first chunk only
    (None: not sent); `data` is read from the message once."""

    data: bytes
    request_id: str = ""
    options: SegmentOptions | None = None


@dataclass(frozen=True)
class SegmentCall:
    """One image of SegmentStream as its door parsed it."""

    request_id: str
    image: bytes
    options: SegmentOptions


@dataclass(frozen=True)
class ModelInfo:
    """GetModelInfo's answer: one model's settings, runtime and labels ("loading" while it loads)."""

    model: str
    name: str = ""
    is_default: bool = False
    weights: str = "loading"
    device: str = "loading"
    runtime: str = "loading"
    max_size: int = 0
    max_batch_size: int = 0
    max_batch_delay_ms: float = 0.0
    max_queue: int = 0
    batch_sizes: tuple[int, ...] = ()
    labels: tuple[Label, ...] = ()
    weights_are_trained: bool = False
    resident_bytes: int = 0


@dataclass(frozen=True)
class StatisticDuration:
    """How many times, and their total in nanoseconds (Triton's StatisticDuration), as of one report."""

    count: int
    ns: int


@dataclass(frozen=True)
class StatisticsReport:
    """Triton's ModelStatistics of one model, a snapshot the data plane takes once; each door only serialises
    it (server/core/statistics.py says what each figure counts)."""

    name: str
    version: str
    last_inference_ms: int
    inference_count: int
    execution_count: int
    success: StatisticDuration
    fail: StatisticDuration
    queue: StatisticDuration
    compute_input: StatisticDuration
    compute_infer: StatisticDuration
    compute_output: StatisticDuration
    batches: tuple[tuple[int, StatisticDuration], ...]
    """(batch size, the model's executions of that size and their time), by size. Decoding and postprocessing
    run per image, not per batch: a batch's own time is the model's."""

    STAGES = ("success", "fail", "queue", "compute_input", "compute_infer", "compute_output")
    """The inference_stats fields, in the protocol's order."""


@dataclass(frozen=True)
class IndexEntry:
    """One model in the Open Inference Protocol's repository index, as both doors answer it."""

    name: str
    version: str
    state: ModelState
    reason: str


class ByteHold(Protocol):
    """Bytes a call holds against the server's stream budget (SEGSERVE_STREAM_BUDGET_BYTES) while it sends."""

    def add(self, size: int) -> None: ...

    def remove(self, size: int) -> None: ...

    def release(self) -> None: ...
