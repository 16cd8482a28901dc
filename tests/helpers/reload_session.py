"""Reload on save seen from the debugger: attach once, edit decode_image, stop in the new code.

Shared by the test on this machine (tests/system/test_reload.py) and the one in a container (tests/containers/).
The client answers debugpy's `debugpyAttach` events as VS Code does on its own; it never attaches again.
"""

from __future__ import annotations

import ast
import itertools
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from client import SegmentClient
from tests.helpers.dap_client import DAPClient, attach_like_vscode, attach_to_subprocess
from tests.helpers.images import encode, photo_like

MARKER = "reload_generation = 2  # added by the reload test"


def line_after_image_assignment(imaging: Path) -> int:
    """The first statement in decode_image after `image = ...`."""
    tree = ast.parse(imaging.read_text())
    function = next(n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef) and n.name == "decode_image")
    for statement, following in itertools.pairwise(function.body):
        if isinstance(statement, ast.Assign) and any(
            isinstance(t, ast.Name) and t.id == "image" for t in statement.targets
        ):
            return following.lineno
    raise AssertionError("decode_image has no `image = ...` statement")


def add_marker_line(imaging: Path) -> int:
    """Saves decode_image with a new statement after `image = ...`; returns that statement's line."""
    line = line_after_image_assignment(imaging)
    lines = imaging.read_text().splitlines(keepends=True)
    indent = lines[line - 1][: len(lines[line - 1]) - len(lines[line - 1].lstrip())]
    lines.insert(line - 1, f"{indent}{MARKER}\n")
    imaging.write_text("".join(lines))
    return line


@dataclass
class ReloadRound:
    edit_to_serving_s: float
    edit_to_breakpoint_s: float
    first_child: int
    second_child: int


def stop_in_reloaded_code(
    debug_port: int, grpc_target: str, imaging: Path, attach_arguments: dict[str, Any], timeout: float = 240
) -> ReloadRound:
    """Attach to the reloading server once, edit `imaging` (the debugger's local file), and stop in the new line."""
    old_line = line_after_image_assignment(imaging)
    parent = DAPClient("127.0.0.1", debug_port, connect_timeout=60)
    sessions = [parent]
    pool = ThreadPoolExecutor(max_workers=1)
    try:
        attach_like_vscode(parent, attach_arguments, {str(imaging): [old_line]})
        first = attach_to_subprocess(parent, {str(imaging): [old_line]}, timeout=timeout)
        sessions.append(first.dap)
        with SegmentClient(grpc_target, timeout=timeout) as client:
            client.wait_until_serving(timeout=timeout)

            edited_at = time.monotonic()
            # The breakpoint stays on its statement, one line down now (as an editor moves it), right after
            # the added one: stopped there, the new process has run the saved code.
            new_line = add_marker_line(imaging) + 1
            child = attach_to_subprocess(parent, {str(imaging): [new_line]}, timeout=timeout)
            second = child.dap
            sessions.append(second)
            assert child.configuration["subProcessId"] != first.configuration["subProcessId"]
            client.wait_until_serving(timeout=timeout)
            serving_at = time.monotonic()
            reply = pool.submit(client.segment, encode(photo_like(97, 61)))

            stopped = second.event("stopped", timeout=timeout)
            stopped_at = time.monotonic()
            assert stopped["reason"] == "breakpoint", stopped
            top = second.request("stackTrace", {"threadId": stopped["threadId"], "levels": 1})["stackFrames"][0]
            assert (top["name"], top["line"]) == ("decode_image", new_line), top
            assert Path(top["source"]["path"]) == imaging, top["source"]
            evaluated = second.request(
                "evaluate", {"expression": "reload_generation", "frameId": top["id"], "context": "watch"}
            )
            assert evaluated["result"] == "2", evaluated
            second.request("continue", {"threadId": stopped["threadId"]})
            result = reply.result(timeout=timeout)
        assert (result.width, result.height) == (97, 61)
        return ReloadRound(
            edit_to_serving_s=serving_at - edited_at,
            edit_to_breakpoint_s=stopped_at - edited_at,
            first_child=int(first.configuration["subProcessId"]),
            second_child=int(child.configuration["subProcessId"]),
        )
    finally:
        pool.shutdown(wait=False, cancel_futures=True)
        for session in reversed(sessions):
            try:
                session.request("disconnect", {"terminateDebuggee": False}, timeout=10)
            except (AssertionError, OSError):
                pass
            session.close()
