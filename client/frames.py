"""Frames of a video over one SegmentStream: what both clients share (encoding, ordering, the window).

The server answers a stream's requests as they finish, so out of order; a video needs them in frame
order, and must not be read whole into memory. FrameWindow holds the frames between the source and the
caller (at most `size` of them) and hands them back in order once their answers are in. It is plain
bookkeeping: the sync and asyncio clients wrap it in their own locks and waits.
"""

from __future__ import annotations

import io
import os
from collections.abc import Generator, Iterable
from dataclasses import dataclass
from functools import cached_property
from typing import Union

import grpc
import numpy as np
from PIL import Image

from client.errors import SegmentError
from client.messages import Options, segment_request
from client.results import SegmentationResult
from client.video import color_mask, overlay_frame, read_frames
from protos.segserve.v1 import segserve_pb2 as pb

Frame = Union[np.ndarray, Image.Image]
VideoInput = Union[str, "os.PathLike[str]", Iterable[Frame]]

# Frames in flight by default: enough for the server to fill its batches (8 by default) while the
# previous answers travel back.
DEFAULT_WINDOW = 16
# JPEG: a 640x480 frame is ~50 KB and encodes in a few ms; PNG would be ~10x larger and slower.
DEFAULT_FRAME_FORMAT = "JPEG"
_JPEG_QUALITY = 90


def as_rgb_array(frame: Frame) -> np.ndarray:
    """(height, width, 3) uint8 RGB from a numpy array (RGB, RGBA or grey) or a PIL image."""
    if isinstance(frame, Image.Image):
        return np.asarray(frame.convert("RGB"))
    if not isinstance(frame, np.ndarray):
        raise TypeError(f"a frame must be a numpy array or a PIL image, not {type(frame).__name__}")
    array = frame
    if array.ndim == 2:
        array = np.repeat(array[..., None], 3, axis=2)
    if array.ndim != 3 or array.shape[2] not in (3, 4):
        raise ValueError(f"a frame must be (height, width, 3) RGB, not an array of shape {frame.shape}")
    if array.dtype != np.uint8:
        raise ValueError(f"a frame must be uint8, not {array.dtype}")
    return np.ascontiguousarray(array[..., :3])


def encode_frame(frame: np.ndarray, frame_format: str = DEFAULT_FRAME_FORMAT) -> bytes:
    buffer = io.BytesIO()
    params: dict[str, object] = {"quality": _JPEG_QUALITY} if frame_format.upper() == "JPEG" else {}
    Image.fromarray(frame).save(buffer, format=frame_format, **params)
    return buffer.getvalue()


@dataclass
class FrameResult:
    """One frame and its segmentation. `reused`: the mask is the last segmented frame's (see `every`)."""

    index: int
    frame: np.ndarray
    result: SegmentationResult
    reused: bool = False

    @property
    def ok(self) -> bool:
        return self.result.ok

    @property
    def error(self) -> SegmentError | None:
        return self.result.error

    @property
    def mask(self) -> np.ndarray:
        """uint8 (height, width) class indices."""
        return self.result.mask

    def overlay(self, opacity: float = 0.5) -> np.ndarray:
        """RGB array: the frame with the class colours laid over it."""
        return overlay_frame(self.frame, self.result.mask_image, opacity)

    @cached_property
    def color_mask(self) -> np.ndarray:
        """RGB array of the class colours (PASCAL VOC palette)."""
        return color_mask(self.result.mask_image)


class FrameWindow:
    """Frames taken from the source and not yet handed back; answers put back in frame order.

    With `every` K > 1 only frames 0, K, 2K... are sent; each frame in between gets the answer of the
    last sent frame before it (marked `reused`), so callers still get one result per frame.
    """

    def __init__(
        self, size: int, every: int = 1, options: Options | None = None, frame_format: str = DEFAULT_FRAME_FORMAT
    ) -> None:
        if size < 1:
            raise ValueError(f"window must be at least 1 frame, not {size}")
        if every < 1:
            raise ValueError(f"every must be at least 1, not {every}")
        self.size = size
        self.every = every
        self.options = options or Options()
        self.frame_format = frame_format
        self.answers_done = False
        self._held: dict[int, np.ndarray] = {}
        self._answers: dict[int, SegmentationResult] = {}
        self._next = 0
        self._last_sent: SegmentationResult | None = None

    @property
    def full(self) -> bool:
        return len(self._held) >= self.size

    @property
    def held(self) -> int:
        return len(self._held)

    def request_for(self, index: int, frame: np.ndarray) -> pb.SegmentRequest | None:
        """The request for this frame, or None when it is skipped (`every`). Pure: call it outside locks."""
        if index % self.every:
            return None
        return segment_request(str(index), encode_frame(frame, self.frame_format), self.options)

    def hold(self, index: int, frame: np.ndarray) -> None:
        self._held[index] = frame

    def answer(self, response: pb.SegmentResponse) -> None:
        """Takes the answer of a frame that was sent and not answered yet.

        Any other answer (a frame handed back or answered already, or one never sent) is SegmentError
        INTERNAL: the stream promises one answer per frame as the caller sees it (client/resume.py), so a
        second one is a bug of the resume or of the server, and one kept would never be handed back, so the
        window would no longer bound what it holds.
        """
        try:
            index = int(response.id)
        except ValueError:
            raise SegmentError(grpc.StatusCode.INTERNAL, f"answer for unknown frame {response.id!r}") from None
        sent = index >= 0 and index % self.every == 0 and (index < self._next or index in self._held)
        if not sent:
            raise SegmentError(grpc.StatusCode.INTERNAL, f"an answer for frame {index}, which was not sent")
        if index < self._next or index in self._answers:
            raise SegmentError(grpc.StatusCode.INTERNAL, f"a second answer for frame {index}")
        self._answers[index] = SegmentationResult.from_proto(response)

    def has_ready(self) -> bool:
        index = self._next
        return index in self._held and (index % self.every != 0 or index in self._answers)

    def pop_ready(self) -> list[FrameResult]:
        """The frames, in order, whose answers are in; their room in the window is freed."""
        ready: list[FrameResult] = []
        while self.has_ready():
            index = self._next
            reused = index % self.every != 0
            if not reused:
                self._last_sent = self._answers.pop(index)
            assert self._last_sent is not None  # frame 0 is always sent, and handed back first
            ready.append(FrameResult(index, self._held.pop(index), self._last_sent, reused))
            self._next += 1
        return ready

    def check_complete(self) -> None:
        """After the stream: every frame taken must have been handed back."""
        if self._held:
            raise SegmentError(
                grpc.StatusCode.INTERNAL, f"the stream ended without answers for {len(self._held)} frame(s)"
            )


def frame_source(path_or_frames: VideoInput) -> Generator[tuple[int, np.ndarray]]:
    """(index, RGB array) for each frame of a video file, or of frames the caller already has."""
    frames: Iterable[Frame] = (
        read_frames(path_or_frames) if isinstance(path_or_frames, (str, os.PathLike)) else path_or_frames
    )
    for index, frame in enumerate(frames):
        yield index, as_rgb_array(frame)
