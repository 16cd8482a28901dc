"""Reload on save (SEGSERVE_RELOAD) on this machine: the server restarts on a .py change, debugger kept.

Each test runs the server from a copy of the source, so the edits never touch the checkout.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from client import SegmentClient
from server.reload import child_command
from tests.helpers.container_files import REPO, debug_launch_config
from tests.helpers.reload_session import stop_in_reloaded_code

STARTED = re.compile(r"reload: server process (\d+) started")


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def copy_source(tmp_path: Path) -> Path:
    app = tmp_path / "app"
    for package in ("server", "client", "protos"):
        shutil.copytree(REPO / package, app / package, ignore=shutil.ignore_patterns("__pycache__"))
    return app


class Output:
    def __init__(self, process: subprocess.Popen[str]) -> None:
        self.lines: list[str] = []
        self._changed = threading.Condition()
        threading.Thread(target=self._read, args=(process,), daemon=True).start()

    def _read(self, process: subprocess.Popen[str]) -> None:
        assert process.stdout is not None
        for line in process.stdout:
            with self._changed:
                self.lines.append(line.rstrip())
                self._changed.notify_all()

    def children(self) -> list[int]:
        return [int(m.group(1)) for line in list(self.lines) if (m := STARTED.search(line))]

    def wait_for_children(self, count: int, timeout: float = 60) -> list[int]:
        deadline = time.monotonic() + timeout
        with self._changed:
            while len(self.children()) < count:
                assert self._changed.wait(max(0.0, deadline - time.monotonic())), self.tail()
        return self.children()

    def tail(self) -> str:
        return "\n".join(self.lines[-40:])


def server_env(app: Path, port: int) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SEGSERVE_", "PYTEST_"))}
    env.update(
        PYTHONPATH=str(app),
        PYDEVD_DISABLE_FILE_VALIDATION="1",
        SEGSERVE_RELOAD="1",
        SEGSERVE_HOST="127.0.0.1",
        SEGSERVE_PORT=str(port),
        SEGSERVE_METRICS_PORT="-1",
        SEGSERVE_WEIGHTS="random",
        SEGSERVE_DEVICE="cpu",
        SEGSERVE_MAX_SIZE="64",
        SEGSERVE_WORKERS="2",
        SEGSERVE_INFERENCE_THREADS="1",
        SEGSERVE_GRACE_PERIOD_S="1",
    )
    return env


@pytest.fixture
def started() -> Iterator[list[subprocess.Popen[str]]]:
    processes: list[subprocess.Popen[str]] = []
    yield processes
    for process in processes:
        if process.poll() is None:
            process.kill()
            process.wait(10)


def test_the_server_child_serves_instead_of_reloading_again() -> None:
    argv = child_command(["--port", "50099", "--reload"])
    assert argv[:4] == [sys.executable, "-Xfrozen_modules=off", "-m", "server"]
    assert argv[-1] == "--no-reload", "the last flag wins: the child must not start a watcher of its own"


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_py_change_restarts_the_server_and_sigterm_stops_both(
    tmp_path: Path, started: list[subprocess.Popen[str]]
) -> None:
    app = copy_source(tmp_path)
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "server"],
        cwd=app,
        env=server_env(app, port),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    started.append(process)
    output = Output(process)
    with SegmentClient(f"127.0.0.1:{port}", timeout=120) as client:
        client.wait_until_serving(timeout=120)
        (first,) = output.wait_for_children(1)

        (app / "server" / "notes.txt").write_text("not python")  # not a reason to restart
        imaging = app / "server" / "core" / "imaging.py"
        imaging.write_text(imaging.read_text() + "\nRELOADED = True\n")
        children = output.wait_for_children(2)
        assert children[:1] == [first] and len(children) == 2, output.tail()
        assert "server/core/imaging.py changed" in output.tail() and "notes.txt" not in output.tail()
        client.wait_until_serving(timeout=120)
        assert client.health() == "SERVING"

    second = children[1]
    with pytest.raises(ProcessLookupError):
        os.kill(first, 0)  # the old server is gone, not left serving beside the new one
    process.send_signal(signal.SIGTERM)
    assert process.wait(60) == 0, output.tail()
    with pytest.raises(ProcessLookupError):
        os.kill(second, 0)


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_an_attached_debugger_stops_in_the_saved_code_without_attaching_again(
    tmp_path: Path, started: list[subprocess.Popen[str]]
) -> None:
    """`make debug` as the Makefile runs it (debugpy, reload on), and launch.json's attach configuration."""
    app = copy_source(tmp_path)
    port, debug_port = free_port(), free_port()
    argv = [sys.executable, "-Xfrozen_modules=off", "-m", "debugpy", "--listen", f"127.0.0.1:{debug_port}"]
    process = subprocess.Popen(
        [*argv, "-m", "server"],
        cwd=app,
        env=server_env(app, port),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    started.append(process)
    output = Output(process)
    launch = debug_launch_config()
    # The debugger's files are the copy here, run from the same place: the mapping is the identity.
    arguments = {
        "justMyCode": launch["justMyCode"],
        "subProcess": launch["subProcess"],
        "connect": {**launch["connect"], "port": debug_port},
        "pathMappings": [{"localRoot": str(app), "remoteRoot": str(app)}],
    }
    measured = stop_in_reloaded_code(debug_port, f"127.0.0.1:{port}", app / "server" / "core" / "imaging.py", arguments)
    assert measured.first_child != measured.second_child
    print(f"edit to SERVING {measured.edit_to_serving_s:.1f} s, to breakpoint {measured.edit_to_breakpoint_s:.1f} s")
    process.send_signal(signal.SIGTERM)
    assert process.wait(60) == 0, output.tail()
