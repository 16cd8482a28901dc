"""Synthetic clips for the video tests: the known-answer model's scenes with a red disc moving about."""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path

import av
import numpy as np

from client.video import VideoWriter
from tests.helpers.known_model import Shape, render_scene

# Frame i shows the disc at stop (7 * i) mod 24 of 24 stops across the middle: consecutive frames are ~24 px
# apart at 160 px wide, so a mask handed back for the wrong frame lands visibly off the disc.
_STOPS, _HOP = 24, 7


def disc_at(index: int) -> Shape:
    """The red disc of frame `index`, a fixed size, hopping along the middle row."""
    stop = (index * _HOP) % _STOPS
    return Shape("red", "disc", cx=0.25 + 0.5 * stop / (_STOPS - 1), cy=0.5, size=0.22)


def shapes_frames(count: int, width: int, height: int) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """`count` RGB frames and their true labels; the background stays put, as a fixed camera's would."""
    frames, truths = [], []
    for index in range(count):
        frame, truth = render_scene(width, height, [disc_at(index)], seed=0)
        frames.append(frame)
        truths.append(truth)
    return frames, truths


def write_shapes_clip(
    path: Path, count: int, width: int = 160, height: int = 120, rate: Fraction = Fraction(25)
) -> list[np.ndarray]:
    """An H.264 clip of the moving disc; returns each frame's true labels."""
    frames, truths = shapes_frames(count, width, height)
    with VideoWriter(path, width, height, rate) as writer:
        for frame in frames:
            writer.write(frame)
    return truths


def write_y4m(path: Path, count: int, width: int = 640, height: int = 480, rate: int = 30) -> None:
    """The moving disc as a raw YUV4MPEG2 file: what Chromium's fake camera plays, in a loop."""
    frames, _ = shapes_frames(count, width, height)
    with av.open(str(path), mode="w", format="yuv4mpegpipe") as container:
        stream = container.add_stream("rawvideo", rate=rate)
        assert isinstance(stream, av.VideoStream)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        for index, rgb in enumerate(frames):
            frame = av.VideoFrame.from_ndarray(rgb, format="rgb24")
            frame.pts = index
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))


def centroid_x(mask: np.ndarray, cls: int) -> float:
    _, xs = np.nonzero(mask == cls)
    return float(xs.mean()) if xs.size else float("nan")
