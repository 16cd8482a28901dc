"""Turning what callers hold (bytes, paths, PIL images) into request messages; shared by both clients."""

from __future__ import annotations

import io
import math
import os
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Union

from PIL import Image

from protos.segserve.v1 import segserve_pb2 as pb

ImageInput = Union[bytes, bytearray, memoryview, str, os.PathLike[str], Image.Image]

# How often a load's waiter reads ListModels for the load's phase.
PROGRESS_POLL_S = 1.0
# wait_until_serving: the pause between health checks, and the most one check may take (a server that
# does not answer is asked again rather than waited for until the deadline).
HEALTH_POLL_S = 0.2
HEALTH_CHECK_MAX_S = 2.0

# Above this an image goes through SegmentUpload in chunks: below the server's unary message limit.
UPLOAD_THRESHOLD = 2 * 1024 * 1024
CHUNK_SIZE = 1024 * 1024


def image_bytes(image: ImageInput) -> bytes:
    if isinstance(image, (bytes, bytearray, memoryview)):
        return bytes(image)
    if isinstance(image, Image.Image):
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        return buffer.getvalue()
    return Path(image).read_bytes()


def default_id(image: ImageInput, fallback: str = "") -> str:
    if isinstance(image, (str, os.PathLike)):
        return Path(image).name
    return fallback


@dataclass(frozen=True)
class Options:
    max_size: int = 0
    overlay: bool = False
    overlay_opacity: float | None = None
    model: str = ""
    """The model's name; empty: the server's default model."""

    def to_proto(self) -> pb.SegmentOptions:
        options = pb.SegmentOptions(max_size=self.max_size, overlay=self.overlay, model=self.model)
        if self.overlay_opacity is not None:
            options.overlay_opacity = self.overlay_opacity
        return options


def segment_request(image_id: str, data: bytes, options: Options) -> pb.SegmentRequest:
    return pb.SegmentRequest(id=image_id, image=data, options=options.to_proto())


def upload_chunks(
    image_id: str, data: bytes, options: Options, chunk_size: int = CHUNK_SIZE
) -> Iterator[pb.ImageChunk]:
    yield pb.ImageChunk(id=image_id, options=options.to_proto(), data=data[:chunk_size])
    for start in range(chunk_size, len(data), chunk_size):
        yield pb.ImageChunk(data=data[start : start + chunk_size])


def stream_requests(
    images: Iterable[ImageInput], options: Options, upload_threshold: int, deferred: list[tuple[str, bytes | OSError]]
) -> Iterator[pb.SegmentRequest]:
    """SegmentStream requests for the images that fit in one message; the rest (too large, or
    unreadable) go into `deferred` for the caller to upload or report after the stream."""
    for index, image in enumerate(images):
        image_id = default_id(image, str(index))
        try:
            data = image_bytes(image)
        except OSError as exc:
            deferred.append((image_id, exc))
            continue
        if len(data) > upload_threshold:
            deferred.append((image_id, data))
            continue
        yield segment_request(image_id, data, options)


@dataclass(frozen=True)
class SingleCall:
    """One image's call: Segment with one message, or SegmentUpload in chunks when it is large."""

    image_id: str
    upload: bool
    request: pb.SegmentRequest | Iterator[pb.ImageChunk]


def single_call(image: ImageInput, options: Options, image_id: str | None, upload_threshold: int) -> SingleCall:
    data = image_bytes(image)
    image_id = image_id if image_id is not None else default_id(image)
    if len(data) > upload_threshold:
        return SingleCall(image_id, True, upload_chunks(image_id, data, options))
    return SingleCall(image_id, False, segment_request(image_id, data, options))


def health_check_timeout(deadline: float) -> float:
    """The timeout of wait_until_serving's next health check, before `deadline` (monotonic)."""
    return max(0.1, min(HEALTH_CHECK_MAX_S, deadline - time.monotonic()))


def load_deadline(timeout: float | None, default: float | None) -> float | None:
    """The gRPC deadline of a load's wait: `timeout` (None: the client's `default`; math.inf: none at all)."""
    limit = default if timeout is None else timeout
    return None if limit is None or math.isinf(limit) else limit


def load_phase(models: Iterable[pb.ModelStatus], model: str) -> str:
    """What the load of `model` is doing, as ListModels says; empty when it is not loading (or not listed)."""
    entry = next((m for m in models if m.name == model), None)
    if entry is None or not (entry.state == "LOADING" or entry.reason.startswith("reloading")):
        return ""
    return entry.reason or "loading"
