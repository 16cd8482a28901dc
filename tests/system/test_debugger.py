"""The debugging workflow for real: debugpy as docker-compose.debug.yml runs it, a DAP client as VS Code attaches.

No container here (tests/containers/test_debug.py runs the overlay for real): the compose debug service's command runs on a copy of the source standing in for the
container's /app, and the client attaches with launch.json's pathMappings, so a breakpoint set on the
checkout's file must be translated to the copy and back.
"""

from __future__ import annotations

import ast
import itertools
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from client import SegmentClient
from tests.helpers.container_files import (
    COMPOSE,
    COMPOSE_DEBUG,
    REPO,
    bind_mount_of_checkout,
    command_args,
    compose_service,
    debug_launch_config,
)
from tests.helpers.dap_client import DAPClient, attach_like_vscode
from tests.helpers.images import encode, photo_like

IMAGING = REPO / "server" / "core" / "imaging.py"


def breakpoint_line() -> int:
    """The first statement in decode_image after `image = ...`, where the decoded image is a local."""
    tree = ast.parse(IMAGING.read_text())
    function = next(n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef) and n.name == "decode_image")
    body = function.body
    for statement, following in itertools.pairwise(body):
        if isinstance(statement, ast.Assign) and any(
            isinstance(t, ast.Name) and t.id == "image" for t in statement.targets
        ):
            return following.lineno
    raise AssertionError("decode_image has no `image = ...` statement to break after")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def container_command(debug_port: int, env: dict[str, str]) -> list[str]:
    """The debug service's command, with the container's python and listen address mapped onto this machine."""
    service = compose_service(COMPOSE_DEBUG, "server", env)
    argv = command_args(service["command"])
    assert argv[0] == "python", argv
    listen = argv.index("--listen")
    assert argv[listen + 1] == "127.0.0.1:5678", "the debug service should listen on loopback only"
    argv[0] = sys.executable
    argv[listen + 1] = f"127.0.0.1:{debug_port}"  # loopback only here: this is no container
    return argv


class ServerOutput:
    """Collects the server's output on a thread and finds its gRPC port in the start-up log."""

    def __init__(self, process: subprocess.Popen[str]) -> None:
        self.lines: list[str] = []
        self.port: int | None = None
        self.ready = threading.Event()
        self._thread = threading.Thread(target=self._read, args=(process,), daemon=True)
        self._thread.start()

    def _read(self, process: subprocess.Popen[str]) -> None:
        assert process.stdout is not None
        for line in process.stdout:
            self.lines.append(line.rstrip())
            if self.port is None and (match := re.search(r"listening on port (\d+)", line)):
                self.port = int(match.group(1))
                self.ready.set()

    def tail(self) -> str:
        return "\n".join(self.lines[-40:])


def attach(dap: DAPClient, launch: dict[str, Any], path_mappings: list[dict[str, str]], line: int) -> None:
    arguments = {"justMyCode": launch.get("justMyCode", True), "pathMappings": path_mappings}
    attach_like_vscode(dap, arguments, {str(IMAGING): [line]})


@pytest.mark.slow
@pytest.mark.timeout(240)
@pytest.mark.parametrize("wait", [False, True], ids=["attach-to-running-server", "DEBUGPY_WAIT=1"])
def test_breakpoint_in_decode_image_stops_with_the_image_among_the_locals(tmp_path: Path, wait: bool) -> None:
    debug = compose_service(COMPOSE_DEBUG, "server")
    container_root = bind_mount_of_checkout(debug)
    assert debug.get("working_dir", container_root) == container_root

    # The container's /app: a copy of the checkout's source, at another path.
    app_dir = tmp_path / container_root.strip("/")
    for package in ("server", "client", "protos"):
        shutil.copytree(REPO / package, app_dir / package, ignore=shutil.ignore_patterns("__pycache__"))

    debug_port = free_port()
    # DEBUGPY_WAIT=1 docker compose ... up: the server starts only once a debugger has attached.
    argv = container_command(debug_port, {"DEBUGPY_WAIT": "1"} if wait else {})
    assert ("--wait-for-client" in argv) is wait
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SEGSERVE_", "PYTEST_"))}
    env.update({k: str(v) for k, v in compose_service(COMPOSE, "server").get("environment", {}).items()})
    env.update(
        PYTHONPATH=str(app_dir),  # the image's PYTHONPATH=/app
        PYDEVD_DISABLE_FILE_VALIDATION="1",
        SEGSERVE_HOST="127.0.0.1",
        SEGSERVE_PORT="0",
        SEGSERVE_METRICS_PORT="0",
        SEGSERVE_WEIGHTS="random",
        SEGSERVE_DEVICE="cpu",
        SEGSERVE_MAX_SIZE="64",
        SEGSERVE_WORKERS="2",
        SEGSERVE_INFERENCE_THREADS="1",
        SEGSERVE_GRACE_PERIOD_S="1",
    )
    launch = debug_launch_config()
    path_mappings = [
        {
            "localRoot": m["localRoot"].replace("${workspaceFolder}", str(REPO)),
            "remoteRoot": str(app_dir) if m["remoteRoot"] == container_root else m["remoteRoot"],
        }
        for m in launch["pathMappings"]
    ]
    line = breakpoint_line()
    sent = photo_like(97, 61)

    process = subprocess.Popen(argv, cwd=app_dir, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    output = ServerOutput(process)
    dap: DAPClient | None = None
    pool = ThreadPoolExecutor(max_workers=1)
    try:
        if wait:
            dap = DAPClient("127.0.0.1", debug_port, connect_timeout=60)
            attach(dap, launch, path_mappings, line)
        assert output.ready.wait(120), f"the server never started listening:\n{output.tail()}"
        with SegmentClient(f"127.0.0.1:{output.port}", timeout=120) as client:
            client.wait_until_serving(timeout=120)
            if not wait:  # attach to the server while it serves, as one does to a running container
                dap = DAPClient("127.0.0.1", debug_port, connect_timeout=60)
                attach(dap, launch, path_mappings, line)
            assert dap is not None
            reply = pool.submit(client.segment, encode(sent))

            stopped = dap.event("stopped", timeout=60)
            assert stopped["reason"] == "breakpoint", stopped
            frames = dap.request("stackTrace", {"threadId": stopped["threadId"], "levels": 5})["stackFrames"]
            top = frames[0]
            assert top["name"] == "decode_image"
            assert top["line"] == line
            # Reported at the checkout's path: the pathMappings took the copy's path back to the local file.
            assert Path(top["source"]["path"]) == IMAGING, top["source"]

            scopes = dap.request("scopes", {"frameId": top["id"]})["scopes"]
            local_scope = next(s for s in scopes if s["name"].lower().startswith("locals"))
            listed = dap.request("variables", {"variablesReference": local_scope["variablesReference"]})
            variables = {v["name"]: v for v in listed["variables"]}
            assert {"image", "data", "max_side", "limits"} <= variables.keys(), variables.keys()
            assert "ImageFile" in variables["image"].get("type", ""), variables["image"]
            size = dap.request("evaluate", {"expression": "image.size", "frameId": top["id"], "context": "watch"})
            assert size["result"] == "(97, 61)"
            assert reply.done() is False, "the request finished while the server was stopped at the breakpoint"

            dap.request("continue", {"threadId": stopped["threadId"]})
            result = reply.result(timeout=120)
        assert (result.width, result.height) == (97, 61)
        assert result.mask.shape == (61, 97)
        dap.request("disconnect", {"terminateDebuggee": False}, timeout=10)
        with SegmentClient(f"127.0.0.1:{output.port}") as after:  # detaching leaves the server serving
            assert after.health(timeout=30) == "SERVING"
    finally:
        pool.shutdown(wait=False, cancel_futures=True)
        if dap is not None:
            dap.close()
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(20)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(10)
    assert process.returncode == 0, f"server exit code {process.returncode}:\n{output.tail()}"
