"""The debug overlay in a real container: debugpy, the checkout bind-mounted, VS Code's attach configuration.

Each test mounts a copy of the checkout (the `checkout` fixture) and edits only that copy.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from client import SegmentClient
from tests.containers.compose import (
    COMPOSE_DEBUG,
    DEBUG_IMAGE,
    SERVER_IMAGE,
    ServerPorts,
    Stack,
    docker,
    free_port,
    image_id,
    loopback_override,
)
from tests.helpers.container_files import bind_mount_of_checkout, compose_service, debug_launch_config
from tests.helpers.dap_client import DAPClient, attach_like_vscode, attach_to_subprocess
from tests.helpers.images import encode, photo_like
from tests.helpers.reload_session import line_after_image_assignment, stop_in_reloaded_code


def attach_arguments(checkout: Path, debug_port: int) -> dict[str, Any]:
    """launch.json's "Attach to server (debugpy)" as VS Code sends it, opened on `checkout`, port moved."""
    launch = debug_launch_config()
    arguments = {key: value for key, value in launch.items() if key not in ("name", "type", "request")}
    arguments["connect"] = {**launch["connect"], "port": debug_port}
    arguments["pathMappings"] = [
        {**m, "localRoot": m["localRoot"].replace("${workspaceFolder}", str(checkout))} for m in launch["pathMappings"]
    ]
    return arguments


def debug_stack(
    stacks: Callable[..., Stack], images: dict[str, str], checkout: Path, env: dict[str, str] | None = None
) -> tuple[Stack, ServerPorts, int]:
    ports, debug_port = ServerPorts(), free_port()
    override = loopback_override(images, {"server": ports}, debug=True, server_env=env)
    # DEBUGPY_LISTEN: the overlay's own knob; with host networking debugpy listens on loopback only.
    stack = stacks(override, debug=True, project_dir=checkout, env={"DEBUGPY_LISTEN": f"127.0.0.1:{debug_port}"})
    stack.up("server")
    return stack, ports, debug_port


def test_the_built_images_declare_the_servers_ports_and_keep_debugpy_on_loopback(images: dict[str, str]) -> None:
    """As the engine built them: `docker run -P` publishes ExposedPorts on every host interface."""

    def config(tag: str) -> dict[str, Any]:
        return json.loads(docker("image", "inspect", "--format", "{{json .Config}}", tag).stdout)

    server, debug = config(SERVER_IMAGE), config(DEBUG_IMAGE)
    assert set(server["ExposedPorts"]) == {"50051/tcp", "8000/tcp", "9464/tcp"}, server["ExposedPorts"]
    assert debug["ExposedPorts"] == server["ExposedPorts"], "the debug image adds an exposed port"
    argv = debug["Cmd"]
    assert argv[argv.index("--listen") + 1] == "127.0.0.1:5678", argv


def test_a_breakpoint_in_decode_image_stops_a_real_request(
    images: dict[str, str], stacks: Callable[..., Stack], checkout: Path
) -> None:
    stack, ports, debug_port = debug_stack(stacks, images, checkout)
    mounts = stack.inspect("server")["Mounts"]
    target = bind_mount_of_checkout(compose_service(COMPOSE_DEBUG, "server"))
    assert any(m["Source"] == str(checkout) and m["Destination"] == target for m in mounts), mounts

    imaging = checkout / "server" / "core" / "imaging.py"
    line = line_after_image_assignment(imaging)
    breakpoints = {str(imaging): [line]}
    parent = DAPClient("127.0.0.1", debug_port, connect_timeout=120)
    sessions = [parent]
    pool = ThreadPoolExecutor(max_workers=1)
    try:
        attach_like_vscode(parent, attach_arguments(checkout, debug_port), breakpoints)
        # The overlay reloads on save, so the server is the watcher's child: VS Code attaches to it by itself.
        child = attach_to_subprocess(parent, breakpoints, timeout=180)
        sessions.append(child.dap)
        assert [(b["verified"], b["line"]) for b in child.breakpoints] == [(True, line)], child.breakpoints
        with SegmentClient(ports.target, timeout=180) as client:
            client.wait_until_serving(timeout=180)
            reply = pool.submit(client.segment, encode(photo_like(97, 61)))
            stopped = child.dap.event("stopped", timeout=120)
            assert stopped["reason"] == "breakpoint", stopped
            top = child.dap.request("stackTrace", {"threadId": stopped["threadId"], "levels": 1})["stackFrames"][0]
            assert (top["name"], top["line"]) == ("decode_image", line)
            # Reported at the checkout's path: pathMappings took the container's /app back to the local file.
            assert Path(top["source"]["path"]) == imaging, top["source"]
            size = child.dap.request("evaluate", {"expression": "image.size", "frameId": top["id"], "context": "watch"})
            assert size["result"] == "(97, 61)"
            assert not reply.done(), "the request finished while the server was stopped at the breakpoint"
            child.dap.request("continue", {"threadId": stopped["threadId"]})
            result = reply.result(timeout=120)
        assert (result.width, result.height) == (97, 61)
    finally:
        pool.shutdown(wait=False, cancel_futures=True)
        for session in reversed(sessions):
            session.close()


def test_an_edit_of_the_mounted_checkout_runs_after_a_restart_without_a_rebuild(
    images: dict[str, str], stacks: Callable[..., Stack], checkout: Path
) -> None:
    """Reload off: the plain edit-restart loop the overlay offers to every editor."""
    stack, ports, _ = debug_stack(stacks, images, checkout, env={"SEGSERVE_RELOAD": "0"})
    stack.wait_healthy("server")
    before = (stack.inspect("server")["Image"], image_id(DEBUG_IMAGE))
    marker = "segserve: running the edited checkout"
    settings = checkout / "server" / "settings.py"
    settings.write_text(settings.read_text() + f"\nimport sys  # noqa: E402\n\nprint({marker!r}, file=sys.stderr)\n")
    assert marker not in stack.logs("server")

    stack.compose("restart", "server", timeout=180)
    stack.wait_healthy("server")
    assert marker in stack.logs("server")
    with SegmentClient(ports.target, timeout=120) as client:
        assert client.health() == "SERVING"
    assert (stack.inspect("server")["Image"], image_id(DEBUG_IMAGE)) == before, "the image changed"


def test_reload_on_save_keeps_the_debugger_attached(
    images: dict[str, str], stacks: Callable[..., Stack], checkout: Path
) -> None:
    """The overlay as it is (SEGSERVE_RELOAD=1): attach once, save decode_image, stop in the saved code."""
    _, ports, debug_port = debug_stack(stacks, images, checkout)
    imaging = checkout / "server" / "core" / "imaging.py"
    measured = stop_in_reloaded_code(debug_port, ports.target, imaging, attach_arguments(checkout, debug_port))
    print(
        f"in a container: edit to SERVING {measured.edit_to_serving_s:.1f} s, "
        f"edit to breakpoint {measured.edit_to_breakpoint_s:.1f} s"
    )
