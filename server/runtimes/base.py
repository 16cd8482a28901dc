"""What every model runtime offers the pipeline: uint8 images of one shape in, uint8 label maps out."""

from __future__ import annotations

import contextlib
import queue
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Generic, Protocol, TypeVar

import numpy as np

from server.labels import Label


@dataclass(frozen=True)
class ModelFacts:
    """What is being served, whichever runtime runs it (ModelInfo and the page show these)."""

    model_name: str
    weights_description: str
    weights_trained: bool
    labels: tuple[Label, ...]


class Runtime(Protocol):
    """The batcher calls `predict` from SEGSERVE_MODEL_INSTANCES worker threads at most (one by default); a
    runtime built for N instances serves N calls at once, each on an engine of its own (InstancePool)."""

    facts: ModelFacts
    precision: str
    """fp32, bf16, fp16 or int8: what the model computes in."""
    description: str
    """Which engine runs the model and how, e.g. "onnxruntime 1.32.0 (CPUExecutionProvider, fp32, 2 threads)"."""

    @property
    def device_name(self) -> str: ...

    def predict(self, images: list[np.ndarray]) -> list[np.ndarray]:
        """uint8 HxWx3 arrays of one shape in, one uint8 HxW label map per image out."""
        ...


T = TypeVar("T")


class InstancePool(Generic[T]):
    """A runtime's N interchangeable engines (sessions, infer requests): a call takes a free one and gives
    it back. Engines are taken in turn, so N calls one after another touch each of them (the warm-up)."""

    def __init__(self, engines: Iterable[T]) -> None:
        self._free: queue.SimpleQueue[T] = queue.SimpleQueue()
        self.size = 0
        for engine in engines:
            self._free.put(engine)
            self.size += 1

    @contextlib.contextmanager
    def take(self) -> Iterator[T]:
        engine = self._free.get()
        try:
            yield engine
        finally:
            self._free.put(engine)
