"""Reload on save (SEGSERVE_RELOAD): this process watches the source and restarts the server as a child.

The server itself runs in a child process, started again whenever a .py file of the source changes. A
process, not an in-place reload: module state (the model, the batcher's loop, grpc's server) is rebuilt
from scratch, so the new code runs exactly as it would after a restart. Under debugpy the child is
started through subprocess, which debugpy follows: an attached debugger gets the new process with its
breakpoints set, and stays attached. -Xfrozen_modules=off so that debugpy can break in every module.
"""

from __future__ import annotations

import logging
import signal
import subprocess
import sys
import threading
from collections.abc import Iterable, Sequence
from pathlib import Path
from types import FrameType

from server.app import HANDLED_SIGNALS

log = logging.getLogger(__name__)

SOURCE_ROOT = Path(__file__).resolve().parents[1]
# What the server imports: a change anywhere else (tests, docs, the page) does not restart it.
WATCHED_PACKAGES = ("server", "client", "protos")


def child_command(argv: Sequence[str]) -> list[str]:
    """`python -m server` with the same flags, serving instead of reloading (a flag beats the environment)."""
    return [sys.executable, "-Xfrozen_modules=off", "-m", "server", *argv, "--no-reload"]


def watched_paths(root: Path = SOURCE_ROOT) -> list[Path]:
    return [root / name for name in WATCHED_PACKAGES if (root / name).is_dir()]


def _relative(paths: Iterable[str], root: Path) -> str:
    names = sorted({str(Path(p).relative_to(root)) if Path(p).is_relative_to(root) else p for p in paths})
    return ", ".join(names)


class ServerChild:
    """The server process; stopped the way a container stops it (SIGTERM: drain, then exit), killed if stuck."""

    def __init__(self, command: list[str], stop_timeout_s: float) -> None:
        self.command = command
        self.stop_timeout_s = stop_timeout_s
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.process = subprocess.Popen(self.command)
        log.info("reload: server process %d started", self.process.pid)

    def signal(self, signum: int) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signum)

    def stop(self) -> int:
        if self.process is None:
            return 0
        self.signal(signal.SIGTERM)
        try:
            return self.process.wait(self.stop_timeout_s)
        except subprocess.TimeoutExpired:  # e.g. held at a breakpoint: its signal handler cannot run
            log.warning(
                "reload: server process %d did not stop in %.0f s; killing it", self.process.pid, self.stop_timeout_s
            )
            self.process.kill()
            return self.process.wait()


def run_with_reload(argv: Sequence[str], grace_period_s: float, root: Path = SOURCE_ROOT) -> int:
    """Serve in a child process, restarted on every change of a .py file; returns the last child's exit code."""
    from watchfiles import PythonFilter, watch

    stopping = threading.Event()
    child = ServerChild(child_command(argv), stop_timeout_s=grace_period_s + 5)

    def forward(signum: int, _frame: FrameType | None) -> None:
        stopping.set()
        child.signal(signum)

    for sig in HANDLED_SIGNALS:
        signal.signal(sig, forward)
    paths = watched_paths(root)
    log.info("reload: watching %s for .py changes", ", ".join(str(p) for p in paths))
    child.start()
    for changes in watch(*paths, watch_filter=PythonFilter(), stop_event=stopping, rust_timeout=500):
        if stopping.is_set():
            break
        log.info("reload: %s changed; restarting the server", _relative((path for _, path in changes), root))
        child.stop()
        if stopping.is_set():
            break
        child.start()
    assert child.process is not None
    try:
        return child.process.wait(grace_period_s + 5)
    except subprocess.TimeoutExpired:
        return child.stop()
