"""A closed loop of calls through the project's client, every call counted by kind and outcome.

Kinds: `segment` (unary Segment), `upload` (SegmentUpload: the image is above the client's upload
threshold), `stream` (segment_many of STREAM_IMAGES images over one SegmentStream) and `video`
(segment_frames of VIDEO_FRAMES frames, checked to come back once each and in order). A stream or video
counts as ok only when every image got its own answer exactly once; `resumed` counts the calls the client
had to resume on another replica (client/resume.py logs each resume). Exactly once is checked where the
client sees the answers: segment_many's ids here, and the video window refuses a second answer for a
frame (client/frames.py, an INTERNAL outcome). The replicas' own count per frame, which would also see a
second answer the client dropped, is checked by tests/cluster/test_stream_resume.py's stand-ins: a real
replica keeps no count per request, and a lost or replaced one takes its counters with it.

The calls run in a child process (multiprocessing, "spawn"; tests/cluster/crashes.py): grpcio's C core once
crashed the test process itself during a rolling update, and the harness could no longer remove the
cluster. A crash of the child is one failed scenario, with its signal, its Python stacks and where its
core dump went in the message, and the cluster still comes down.
"""

from __future__ import annotations

import contextlib
import io
import logging
import multiprocessing
import multiprocessing.connection
import os
import shutil
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from client import SegmentClient, SegmentError
from tests.cluster.crashes import (
    DUMP_SIGNAL,
    STACKS_FILE,
    artifacts_folder,
    core_location,
    how_it_ended,
    prepare_for_a_crash,
)

STREAM_IMAGES = 6
VIDEO_FRAMES = 24
CALL_TIMEOUT_S = 60.0
UPLOAD_THRESHOLD = 48 * 1024  # the upload image is above it, the others far below
KINDS = ("segment", "upload", "stream", "video")
ABORT_ENV = "SEGSERVE_CLUSTER_LOAD_ABORT_AFTER_S"
"""Seconds after its start at which the load generator aborts itself (os.abort): a crash on demand, to see
a scenario fail with its stacks and the cluster come down. Unset: never."""
# Spawning the child and importing numpy, grpcio and the client, on two busy cores.
START_TIMEOUT_S = 120.0
# A call in flight ends first (Calls.stop), then the counts travel back.
STOP_TIMEOUT_S = CALL_TIMEOUT_S * 2 + 30


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


@contextlib.contextmanager
def resumes_counted() -> Iterator[_ResumeCounter]:
    """Counts the streams this process's clients resume while the block runs (the Load's own calls run in its
    child and count there)."""
    counter = _ResumeCounter()
    logger = logging.getLogger("client.resume")
    level = logger.level
    logger.addHandler(counter)
    logger.setLevel(logging.INFO)
    try:
        yield counter
    finally:
        logger.removeHandler(counter)
        logger.setLevel(level)


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


class Calls:
    """Threads calling in a closed loop (one call after the other) until stopped: the child's work."""

    def __init__(self, target: str, kinds: tuple[str, ...]) -> None:
        self.target = target
        self.kinds = kinds
        self.counts = Counts()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._resumes = _ResumeCounter()

    def start(self) -> None:
        logging.getLogger("client.resume").addHandler(self._resumes)
        logging.getLogger("client.resume").setLevel(logging.INFO)
        for kind in self.kinds:
            thread = threading.Thread(target=self._loop, args=(kind,), daemon=True, name=f"load-{kind}")
            thread.start()
            self._threads.append(thread)

    def stop(self) -> Counts:
        """Stops the loops; a call in flight ends first (it is counted), within its own timeout."""
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=CALL_TIMEOUT_S * 2)
        logging.getLogger("client.resume").removeHandler(self._resumes)
        with self._lock:
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


class Load:
    """Calls in a closed loop from a child process, from `with` until its end; then `counts`.

    `counts` raises AssertionError when the child did not end well (a crash, an exit, a hang): its signal or
    exit code, the file with its threads' Python stacks and where its core dump went. Each Load gets a new
    folder for these under `artifacts` (default: $SEGSERVE_CLUSTER_ARTIFACTS, else the temp folder); the
    child works there. `abort_after_s` (default: $SEGSERVE_CLUSTER_LOAD_ABORT_AFTER_S) makes the child
    abort itself that long after it starts; `core_dumps=False` keeps such a crash from writing a core (the
    child's core is large, and one of a deliberate abort tells nothing).
    """

    def __init__(
        self,
        target: str,
        kinds: tuple[str, ...] = KINDS,
        *,
        artifacts: Path | None = None,
        abort_after_s: float | None = None,
        core_dumps: bool = True,
    ) -> None:
        self.target = target
        self.kinds = kinds
        self.artifacts = artifacts
        from_env = os.environ.get(ABORT_ENV)
        self.abort_after_s = abort_after_s if abort_after_s is not None else float(from_env) if from_env else None
        self.folder: Path | None = None
        self._process: BaseProcess | None = None
        self._conn: Connection | None = None
        self.core_dumps = core_dumps
        self.core_limit: int | None = None
        """The child's core-size limit (RLIMIT_CORE) once it has started: its hard limit, or 0."""
        self._counts: Counts | None = None
        self._failure: str | None = None

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.is_alive()

    @property
    def counts(self) -> Counts:
        """Every call the child made, once it has stopped; AssertionError when it did not end well."""
        if self._failure is not None:
            raise AssertionError(self._failure)
        if self._counts is None:
            raise RuntimeError("the load's counts are known once it has stopped (after its `with`)")
        return self._counts

    def __enter__(self) -> Load:
        self.folder = artifacts_folder(self.artifacts, "segserve-load")
        context = multiprocessing.get_context("spawn")
        ours, theirs = context.Pipe()
        args = (theirs, self.target, self.kinds, str(self.folder), self.abort_after_s, self.core_dumps)
        self._process = context.Process(target=_child, args=args, name="segserve-load", daemon=True)
        self._process.start()
        theirs.close()  # the child holds its end: its death reads as the end of the pipe here
        self._conn = ours
        started = self._receive(START_TIMEOUT_S, "while starting")
        if started is None:
            ours.close()
            raise AssertionError(self._failure)
        self.core_limit = int(started)
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *exc: object) -> None:
        self.stop_child()
        if exc_type is not None and self._failure is not None:
            # The body failed too, perhaps because of it: the crash first, the body's error as its context.
            raise AssertionError(self._failure)

    def stop(self) -> Counts:
        self.stop_child()
        return self.counts

    def stop_child(self) -> None:
        """Asks the child to stop, takes its counts and waits for its end; a child that does not answer
        dumps its stacks (crashes.DUMP_SIGNAL) and is killed. Its folder is removed when it ended well.
        Safe to call more than once."""
        if self._process is None or self._conn is None or self._counts is not None or self._failure is not None:
            return
        with contextlib.suppress(OSError):  # a child already gone reads as such in _receive
            self._conn.send("stop")
        when = "while stopping" if self._process.is_alive() else "during the scenario"
        counts = self._receive(STOP_TIMEOUT_S, when)
        self._process.join(timeout=30)
        if counts is not None and self._process.exitcode not in (0, None):
            self._failure = self._ended("after it had sent its counts")
        elif counts is not None and self._process.exitcode is None:
            self._failure = self._hung("to exit after sending its counts", 30)
        self._counts = counts
        self._conn.close()
        if self._failure is None and self.folder is not None:
            shutil.rmtree(self.folder, ignore_errors=True)  # an empty stacks file: nothing to keep

    def _receive(self, timeout: float, when: str) -> Any:
        """The child's next message, or None with `_failure` set: it died, or said nothing in `timeout`."""
        assert self._process is not None and self._conn is not None
        multiprocessing.connection.wait([self._conn, self._process.sentinel], timeout)
        if self._conn.poll():
            try:
                return self._conn.recv()
            except EOFError:
                pass
        self._process.join(timeout=5)
        if self._process.exitcode is None:
            self._failure = self._hung(f"to answer {when}", timeout)
        else:
            self._failure = self._ended(when)
        return None

    def _hung(self, what: str, waited: float) -> str:
        assert self._process is not None and self._process.pid is not None
        with contextlib.suppress(OSError):
            os.kill(self._process.pid, DUMP_SIGNAL)
            time.sleep(2)
        self._process.kill()
        self._process.join(timeout=10)
        return (
            f"the load generator (pid {self._process.pid}, tests/cluster/load.py) failed {what} within "
            f"{waited:.0f} s and was killed; its calls are not counted. Its threads' Python stacks: {self._stacks()}"
        )

    def _ended(self, when: str) -> str:
        assert self._process is not None and self._process.pid is not None and self._process.exitcode is not None
        assert self.folder is not None
        if self._process.exitcode < 0:
            core = core_location(self._process.pid, self.folder, self.core_limit)
            left = f"Its core dump: {core if self.core_dumps else 'none, turned off for this load (core_dumps=False)'}."
        else:
            left = "Its Python traceback, if it had one, is in the test's captured stderr."
        return (
            f"the load generator (pid {self._process.pid}, tests/cluster/load.py) "
            f"{how_it_ended(self._process.exitcode)} {when}; its calls are not counted. "
            f"Its threads' Python stacks: {self._stacks()}. {left}"
        )

    def _stacks(self) -> str:
        assert self.folder is not None
        stacks = self.folder / STACKS_FILE
        if not stacks.is_file():
            return f"{stacks} (not written: it ended before faulthandler was on)"
        return (
            f"{stacks} ({'a faulthandler dump' if stacks.stat().st_size else 'empty: no fatal signal reached Python'})"
        )


def _child(
    conn: Connection,
    target: str,
    kinds: tuple[str, ...],
    folder: str,
    abort_after_s: float | None,
    core_dumps: bool,
) -> None:
    """The child process: prepares for a crash, calls until the parent says stop (or is gone), sends the counts."""
    _stacks, core_limit = prepare_for_a_crash(Path(folder), core_dumps)
    calls = Calls(target, kinds)
    calls.start()
    if abort_after_s is not None:
        abort = threading.Timer(abort_after_s, os.abort)
        abort.daemon = True
        abort.start()
    conn.send(core_limit)
    with contextlib.suppress(EOFError):  # EOF: the parent is gone, so stop as well
        conn.recv()
    counts = calls.stop()
    with contextlib.suppress(OSError):
        conn.send(counts)


def wait_until(predicate: Any, timeout: float, what: str, every: float = 0.5) -> float:
    started = time.monotonic()
    while not predicate():
        if time.monotonic() - started > timeout:
            raise AssertionError(f"{what}: not after {timeout:.0f} s")
        time.sleep(every)
    return time.monotonic() - started
