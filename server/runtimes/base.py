"""What every model runtime offers the pipeline: uint8 images of one shape in, uint8 label maps out."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

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
    """Not thread-safe by design: the batcher calls `predict` from one worker thread."""

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
