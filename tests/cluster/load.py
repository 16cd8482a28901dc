"""A closed loop of calls through the project's client, every call counted by kind and outcome.

Kinds: `segment` (unary Segment), `upload` (SegmentUpload: the image is above the client's upload
threshold), `stream` (segment_many of STREAM_IMAGES images over one SegmentStream) and `video`
(segment_frames of VIDEO_FRAMES frames, checked to come back once each and in order). A stream or video
counts as ok only when every image got its own answer exactly once; `resumed` counts the calls the client
had to resume on another replica (client/resume.py logs each resume).
"""

from __future__ import annotations

import io
import logging
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from PIL import Image

from client import SegmentClient, SegmentError

STREAM_IMAGES = 6
VIDEO_FRAMES = 24
CALL_TIMEOUT_S = 60.0
UPLOAD_THRESHOLD = 48 * 1024  # the upload image is above it, the others far below


def png(width: int, height: int, seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (height, width, 3), dtype=np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


SMALL = [png(64, 48, seed) for seed in range(STREAM_IMAGES)]
LARGE = png(160, 120, 99)  # about 57 KB of noise: SegmentUpload in chunks
FRAMES = [np.random.default_rng(seed).integers(0, 255, (48, 64, 3), dtype=np.uint8) for seed in range(VIDEO_FRAMES)]
assert len(LARGE) > UPLOAD_THRESHOLD


class _ResumeCounter(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.count = 0

    def emit(self, record: logging.LogRecord) -> None:
        if "resuming a stream" in record.getMessage():
            self.count += 1


@dataclass
class Counts:
    outcomes: Counter[tuple[str, str]] = field(default_factory=Counter)
    errors: list[str] = field(default_factory=list)
    resumed: int = 0

    def sent(self, kind: str | None = None) -> int:
        return sum(n for (k, _), n in self.outcomes.items() if kind in (None, k))

    def failed(self) -> dict[str, int]:
        return {f"{k}:{o}": n for (k, o), n in sorted(self.outcomes.items()) if o != "ok"}

    def summary(self) -> str:
        kinds = sorted({k for k, _ in self.outcomes})
        parts = [f"{k} {self.outcomes[(k, 'ok')]}/{self.sent(k)} ok" for k in kinds]
        return f"{self.sent()} calls ({', '.join(parts)}); failed {self.failed() or 'none'}; streams resumed {self.resumed}"


class Load:
    """Threads calling in a closed loop (one call after the other) until stopped."""

    def __init__(self, target: str, kinds: tuple[str, ...] = ("segment", "upload", "stream", "video")) -> None:
        self.target = target
        self.kinds = kinds
        self.counts = Counts()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._resumes = _ResumeCounter()
        self.served_by_first: dict[str, float] = {}

    def __enter__(self) -> Load:
        logging.getLogger("client.resume").addHandler(self._resumes)
        logging.getLogger("client.resume").setLevel(logging.INFO)
        for kind in self.kinds:
            thread = threading.Thread(target=self._loop, args=(kind,), daemon=True, name=f"load-{kind}")
            thread.start()
            self._threads.append(thread)
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> Counts:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=CALL_TIMEOUT_S * 2)
        logging.getLogger("client.resume").removeHandler(self._resumes)
        self.counts.resumed = self._resumes.count
        return self.counts

    def _record(self, kind: str, outcome: str, error: str = "") -> None:
        with self._lock:
            self.counts.outcomes[(kind, outcome)] += 1
            if error and len(self.counts.errors) < 20:
                self.counts.errors.append(f"{kind}: {error}")

    def _loop(self, kind: str) -> None:
        with SegmentClient(self.target, timeout=CALL_TIMEOUT_S, upload_threshold=UPLOAD_THRESHOLD) as client:
            n = 0
            while not self._stop.is_set():
                n += 1
                try:
                    self._call(client, kind, n)
                except SegmentError as exc:
                    self._record(kind, exc.code.name, str(exc))
                except AssertionError as exc:
                    self._record(kind, "WRONG_ANSWER", str(exc))
                else:
                    self._record(kind, "ok")

    def _call(self, client: SegmentClient, kind: str, n: int) -> None:
        if kind == "segment":
            result = client.segment(SMALL[n % len(SMALL)])
            assert (result.width, result.height) == (64, 48), result
        elif kind == "upload":
            result = client.segment(LARGE)
            assert (result.width, result.height) == (160, 120), result
        elif kind == "stream":
            results = list(client.segment_many(SMALL))
            failed = [r for r in results if not r.ok]
            if failed and failed[0].error is not None:
                raise failed[0].error
            ids: Any = sorted(r.id for r in results)
            assert ids == sorted(str(i) for i in range(len(SMALL))), f"answers {ids}"
        elif kind == "video":
            frames = list(client.segment_frames(FRAMES, window=4))
            bad = [f for f in frames if not f.ok]
            if bad and bad[0].error is not None:
                raise bad[0].error
            indices = [f.index for f in frames]
            assert indices == list(range(len(FRAMES))), f"frames {indices}"
        else:
            raise ValueError(kind)


def wait_until(predicate: Any, timeout: float, what: str, every: float = 0.5) -> float:
    started = time.monotonic()
    while not predicate():
        if time.monotonic() - started > timeout:
            raise AssertionError(f"{what}: not after {timeout:.0f} s")
        time.sleep(every)
    return time.monotonic() - started
