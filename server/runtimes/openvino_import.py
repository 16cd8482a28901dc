"""Importing OpenVINO without its usage telemetry.

`import openvino` starts OpenVINO's telemetry (openvino_telemetry, through openvino.tools.ovc), which is on
unless the user opted out, and sends events to Google Analytics from a forked child process. A server has
no business reporting home; offline, that child lingers, and the server's exit waits for it (under an
attached debugger it never came back, and tests/system/test_reload.py saw the process killed). The
telemetry declines itself in CI environments (CI=true), its one switch that needs no file in the user's
home, so the import runs with that set, and only the import.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import threading
from collections.abc import Iterator
from types import ModuleType

_LOCK = threading.Lock()


@contextlib.contextmanager
def telemetry_declined() -> Iterator[None]:
    with _LOCK:
        saved = os.environ.get("CI")
        os.environ["CI"] = "true"
        try:
            yield
        finally:
            if saved is None:
                del os.environ["CI"]
            else:
                os.environ["CI"] = saved


def import_openvino() -> ModuleType:
    with telemetry_declined():
        return importlib.import_module("openvino")
