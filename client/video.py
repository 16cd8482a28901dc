"""Reading and writing video files (PyAV, which bundles its own FFmpeg), and drawing masks on frames."""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from types import TracebackType

import av
import numpy as np
from PIL import Image

# Fast to encode and playable everywhere; WebM files get VP9, the codec that container is for.
_CODEC_BY_SUFFIX = {".webm": "libvpx-vp9"}
_DEFAULT_CODEC = "libx264"
_CODEC_OPTIONS = {"libx264": {"preset": "veryfast", "crf": "20"}, "libvpx-vp9": {"deadline": "realtime", "crf": "32"}}


class NotAVideoError(ValueError):
    """The file cannot be read as a video; the message is one readable sentence."""


@dataclass(frozen=True)
class VideoInfo:
    width: int
    height: int
    rate: Fraction
    # From the container's header; None when it does not say (some streams only know at the end).
    frames: int | None


def _video_stream(container: av.container.InputContainer, path: Path) -> av.VideoStream:
    name = container.format.name
    # FFmpeg opens a lone image as a one-frame "video" (image2, png_pipe, jpeg_pipe...); for us it is an image.
    if name == "image2" or name.endswith("_pipe"):
        raise NotAVideoError(f"{path.name} is an image, not a video: use `python -m client segment` for images")
    if not container.streams.video:
        raise NotAVideoError(f"{path.name} has no video stream")
    return container.streams.video[0]


def _open(path: str | os.PathLike[str]) -> tuple[av.container.InputContainer, av.VideoStream]:
    source = Path(path)
    if not source.is_file():
        raise NotAVideoError(f"no such file: {source}")
    try:
        container = av.open(str(source), mode="r")
    except av.FFmpegError as exc:
        raise NotAVideoError(f"{source.name} is not a video we can read ({exc.strerror or exc})") from None
    try:
        return container, _video_stream(container, source)
    except NotAVideoError:
        container.close()
        raise


def probe(path: str | os.PathLike[str]) -> VideoInfo:
    """Size, frame rate and frame count of a video file; NotAVideoError if it is not one."""
    container, stream = _open(path)
    with container:
        rate = stream.average_rate or stream.guessed_rate or Fraction(30)
        return VideoInfo(stream.width, stream.height, Fraction(rate), stream.frames or None)


def read_frames(path: str | os.PathLike[str]) -> Iterator[np.ndarray]:
    """The video's frames as RGB uint8 arrays (height, width, 3), one at a time."""
    container, stream = _open(path)
    stream.thread_type = "AUTO"
    with container:
        try:
            for frame in container.decode(stream):
                yield frame.to_ndarray(format="rgb24")
        except av.FFmpegError as exc:
            raise NotAVideoError(f"{Path(path).name}: cannot decode past this frame ({exc.strerror or exc})") from None


class VideoWriter:
    """Writes RGB frames at a constant frame rate. close() (or leaving the `with`) flushes the encoder and
    finishes the container, so a file closed early (after Ctrl-C) is still a playable, shorter video."""

    def __init__(
        self, path: str | os.PathLike[str], width: int, height: int, rate: Fraction, codec: str | None = None
    ) -> None:
        target = Path(path)
        codec = codec or _CODEC_BY_SUFFIX.get(target.suffix.lower(), _DEFAULT_CODEC)
        self.frames = 0
        self._container = av.open(str(target), mode="w")
        try:
            stream = self._container.add_stream(codec, rate=rate)
            if not isinstance(stream, av.VideoStream):
                raise ValueError(f"{codec} is not a video codec")
            self._stream = stream
            self._stream.width, self._stream.height = width, height
            # 4:2:0 chroma needs even sides; odd-sized videos keep full chroma instead of being cropped.
            self._stream.pix_fmt = "yuv420p" if width % 2 == 0 and height % 2 == 0 else "yuv444p"
            self._stream.options = dict(_CODEC_OPTIONS.get(codec, {}))
        except BaseException:
            self._container.close()
            raise

    def write(self, rgb: np.ndarray) -> None:
        frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(rgb, dtype=np.uint8), format="rgb24")
        frame.pts = self.frames
        self._container.mux(self._stream.encode(frame))
        self.frames += 1

    def close(self) -> None:
        try:
            self._container.mux(self._stream.encode(None))
        finally:
            self._container.close()

    def __enter__(self) -> VideoWriter:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


def _palette_colors(mask_image: Image.Image) -> np.ndarray:
    """(256, 3) uint8 colours of the mask PNG's own palette (the server's VOC palette)."""
    palette = np.zeros((256, 3), dtype=np.uint8)
    values = np.asarray(mask_image.getpalette() or [], dtype=np.uint8)[: 256 * 3]
    palette.reshape(-1)[: values.size] = values
    return palette


def color_mask(mask_image: Image.Image) -> np.ndarray:
    """The class colours as an RGB array, from a palette mask PNG as the server returns it."""
    labels = np.asarray(mask_image, dtype=np.uint8)
    return _palette_colors(mask_image)[labels]


def overlay_frame(frame: np.ndarray, mask_image: Image.Image, opacity: float = 0.5) -> np.ndarray:
    """The frame with each pixel's class colour laid over it; background (class 0) left untouched.

    Done here rather than asking the server for overlay_png: the client already holds the frame, and an
    RGB PNG per frame would cost the server more than the segmentation's own postprocessing.
    """
    labels = np.asarray(mask_image, dtype=np.uint8)
    colours = _palette_colors(mask_image)[labels].astype(np.float32)
    blended = frame.astype(np.float32) * (1.0 - opacity) + colours * opacity
    foreground = (labels != 0)[..., None]
    return np.where(foreground, blended.round().astype(np.uint8), frame)
