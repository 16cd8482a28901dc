"""The core's value types: what a request asks for (SegmentOptions), the same once its model has checked it
(ResolvedOptions), and what it gets (SegmentResult, Timing).

Plain frozen dataclasses that every door converts to and from its own messages; importing them never loads
a runtime, a batcher or torch.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from server.core.postprocess import ClassShare


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
class ResolvedOptions:
    """A request's options as its model runs them (ModelPipeline.resolve): checked once, when the request
    has its model, and never again on the way to the model."""

    max_size: int
    """The longest side the image is resized to: the request's, capped by the model's, or the model's."""
    overlay_opacity: float | None
    """The overlay's opacity; None: no overlay."""
    mask_png: bool
    label_map: bool


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
