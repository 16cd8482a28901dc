"""The Live and Video tabs: a camera's frames segmented as they come, and uploaded clips segmented whole.

Live: Gradio's streaming image input posts the camera's frames to the page's server, which keeps only
the newest frame that arrived while the previous one was being segmented (each post replaces the
pending one: gradio/routes.py, "/stream/{event_id}"). So when the server falls behind, stale frames
are dropped and the delay stays one frame's round trip, rather than a queue that grows.
"""

from __future__ import annotations

import logging
import tempfile
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from html import escape
from pathlib import Path

import numpy as np

from client import SegmentClient, SegmentError
from client.frames import encode_frame
from client.video import NotAVideoError, VideoWriter, overlay_frame, probe
from gradio_ui import render

log = logging.getLogger(__name__)

# Frames/s is measured over the last few seconds of answers, so it follows changes within a few seconds.
RATE_WINDOW_S = 3.0
LATENCY_SAMPLES = 20
# The clip page redraws its status this often; more would cost the browser more than it tells.
PROGRESS_EVERY_S = 0.5


@dataclass
class LiveStats:
    """One browser tab's live session: when frames were answered and how long each took."""

    answered: deque[float] = field(default_factory=deque)
    latencies_ms: deque[float] = field(default_factory=lambda: deque(maxlen=LATENCY_SAMPLES))
    frames: int = 0

    def add(self, done: float, latency_ms: float) -> None:
        self.frames += 1
        self.answered.append(done)
        self.latencies_ms.append(latency_ms)
        while self.answered and done - self.answered[0] > RATE_WINDOW_S:
            self.answered.popleft()

    @property
    def frames_per_s(self) -> float:
        if len(self.answered) < 2:
            return 0.0
        span = self.answered[-1] - self.answered[0]
        return (len(self.answered) - 1) / span if span > 0 else 0.0

    @property
    def latency_ms(self) -> float:
        return float(np.mean(self.latencies_ms)) if self.latencies_ms else 0.0


def live_stats_html(stats: LiveStats, server_ms: float, model_size: tuple[int, int]) -> str:
    chips = [
        ("frames/s", f"{stats.frames_per_s:.1f}", "segserve-live-fps"),
        ("latency", f"{stats.latency_ms:.0f} ms", "segserve-live-latency"),
        ("on server", f"{server_ms:.0f} ms", ""),
        ("model input", f"{model_size[0]}x{model_size[1]}", ""),
        ("frames", str(stats.frames), "segserve-live-frames"),
    ]
    body = "".join(
        '<span class="segserve-chip"'
        + (f' id="{chip_id}"' if chip_id else "")
        + f"><b>{escape(k)}</b> {escape(v)}</span>"
        for k, v, chip_id in chips
    )
    return f'<div class="segserve-timing" id="segserve-live-chips">{body}</div>'


class VideoActions:
    """Event handlers of the Live and Video tabs; `describe` turns a failed call into the page's sentence."""

    def __init__(self, client: SegmentClient, describe: Callable[[SegmentError], str]) -> None:
        self.client = client
        self.describe = describe

    def segment_live(
        self,
        frame: np.ndarray | None,
        max_size: float,
        opacity: float,
        stats: LiveStats | None,
        model: str | None = "",
    ) -> tuple[np.ndarray | None, str, LiveStats | None]:
        """One camera frame -> its overlay, the measured frames/s and latency, the session's stats."""
        if frame is None:
            return None, render.status("Allow the camera, then press record to start."), stats
        stats = stats or LiveStats()
        started = time.perf_counter()
        try:
            result = self.client.segment(
                encode_frame(frame[..., :3]), max_size=int(max_size), model=model or "", image_id="live"
            )
            overlay = overlay_frame(frame[..., :3], result.mask_image, float(opacity))
        except SegmentError as exc:
            return None, render.status(self.describe(exc), "error"), stats
        except Exception:  # a bug of ours: the log gets the traceback, the page a sentence
            log.exception("live frame failed")
            return None, render.status("Something went wrong in the page; see its log.", "error"), stats
        done = time.perf_counter()
        stats.add(done, (done - started) * 1000)
        return overlay, live_stats_html(stats, result.timing.total_ms, result.model_size), stats

    def segment_clip(
        self, clip: str | None, max_size: float, opacity: float, every: float, model: str | None = ""
    ) -> Iterator[tuple[str | None, str]]:
        """An uploaded clip -> the segmented clip (same size, frame count and rate), with progress on the way."""
        if not clip:
            yield None, render.status("Upload a short clip first.")
            return
        name = Path(clip).name
        try:
            info = probe(clip)
        except NotAVideoError as exc:
            yield None, render.status(f"“{name}” is not a video we can read: {_reason(exc)}", "error")
            return
        out = Path(tempfile.mkdtemp(prefix="segserve-video-")) / f"{Path(clip).stem}.segmented.mp4"
        total = info.frames
        started = last_shown = time.perf_counter()
        yield None, render.status(f"Segmenting {name}: {info.width}x{info.height}, {float(info.rate):.3g} fps…")
        try:
            with VideoWriter(out, info.width, info.height, info.rate) as writer:
                frames = self.client.segment_video(
                    clip, max_size=int(max_size), model=model or "", every=max(1, int(every))
                )
                for item in frames:
                    writer.write(item.frame if item.error is not None else item.overlay(float(opacity)))
                    now = time.perf_counter()
                    if now - last_shown >= PROGRESS_EVERY_S:
                        last_shown = now
                        yield None, render.status(_progress(writer.frames, total, now - started))
        except SegmentError as exc:
            yield None, render.status(self.describe(exc), "error")
            return
        except NotAVideoError as exc:
            yield None, render.status(f"“{name}” could not be read to the end: {_reason(exc)}", "error")
            return
        except Exception:
            log.exception("segment clip %s failed", name)
            yield None, render.status("Something went wrong in the page; see its log.", "error")
            return
        elapsed = time.perf_counter() - started
        done = (
            f"Segmented {writer.frames} frames of {name} in {elapsed:.1f} s ({writer.frames / elapsed:.1f} frames/s)."
        )
        yield str(out), render.status(done, "ok")


def _reason(exc: NotAVideoError) -> str:
    text = str(exc)
    return text.split("(", 1)[1].rstrip(")") if "(" in text else text


def _progress(done: int, total: int | None, elapsed: float) -> str:
    rate = done / elapsed if elapsed > 0 else 0.0
    if total:
        left = (total - done) / rate if rate > 0 else 0.0
        return f"{done} of {total} frames done, {rate:.1f} frames/s, about {left:.0f} s left."
    return f"{done} frames done, {rate:.1f} frames/s."
