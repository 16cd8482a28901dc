"""What a call returns: the mask as an array and a PIL image, the classes, the overlay, timings."""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from functools import cached_property

import grpc
import numpy as np
from PIL import Image

from client.errors import SegmentError
from protos.segserve.v1 import segserve_pb2 as pb


@dataclass(frozen=True)
class ClassShare:
    index: int
    name: str
    fraction: float


@dataclass(frozen=True)
class Timing:
    preprocess_ms: float
    queue_ms: float
    inference_ms: float
    postprocess_ms: float
    total_ms: float
    batch_size: int


@dataclass
class SegmentationResult:
    """One image's answer. In SegmentStream results `error` may be set, and then there is no mask."""

    id: str
    width: int
    height: int
    classes: list[ClassShare]
    timing: Timing
    mask_png: bytes
    overlay_png: bytes = b""
    error: SegmentError | None = None
    model_size: tuple[int, int] = (0, 0)
    response: pb.SegmentResponse | None = field(default=None, repr=False)

    @property
    def ok(self) -> bool:
        return self.error is None

    @cached_property
    def mask_image(self) -> Image.Image:
        """Palette ("P") image whose pixel values are the model's class indices (PASCAL VOC's by default)."""
        if self.error is not None:
            raise self.error
        image = Image.open(io.BytesIO(self.mask_png))
        image.load()
        return image

    @cached_property
    def mask(self) -> np.ndarray:
        """uint8 array (height, width) of class indices."""
        return np.asarray(self.mask_image, dtype=np.uint8)

    @cached_property
    def overlay(self) -> Image.Image | None:
        if not self.overlay_png:
            return None
        image = Image.open(io.BytesIO(self.overlay_png))
        image.load()
        return image

    def summary(self, limit: int = 5) -> str:
        """'person 41.0%, __background__ 55.2%, dog 3.8%'."""
        return ", ".join(f"{c.name} {c.fraction * 100:.1f}%" for c in self.classes[:limit])

    @classmethod
    def from_proto(cls, response: pb.SegmentResponse) -> SegmentationResult:
        t = response.timing
        error = None
        if response.HasField("error") and response.error.code != 0:
            error = SegmentError.from_status_number(response.error.code, response.error.message, response.id)
        return cls(
            id=response.id,
            width=response.width,
            height=response.height,
            classes=[ClassShare(c.index, c.name, c.fraction) for c in response.classes],
            timing=Timing(t.preprocess_ms, t.queue_ms, t.inference_ms, t.postprocess_ms, t.total_ms, t.batch_size),
            mask_png=response.mask_png,
            overlay_png=response.overlay_png,
            error=error,
            model_size=(response.model_width, response.model_height),
            response=response,
        )


def failed_result(image_id: str, error: SegmentError) -> SegmentationResult:
    return SegmentationResult.from_proto(
        pb.SegmentResponse(id=image_id, error=pb.Error(code=error.code.value[0], message=error.message))
    )


def unreadable_result(image_id: str, error: OSError) -> SegmentationResult:
    """An image of segment_many that could not even be read from disk."""
    return failed_result(image_id, SegmentError(grpc.StatusCode.INVALID_ARGUMENT, f"cannot read image: {error}"))
