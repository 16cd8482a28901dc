"""`python -m gradio_ui.launch` (`make run`): the server and the page together; Ctrl-C stops both.

The server runs as a child process (`python -m server`, configured by SEGSERVE_*); the page starts
once the server's health check says SERVING, and talks to it on localhost at SEGSERVE_PORT.
"""

from __future__ import annotations

import logging
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from types import FrameType

from pydantic import ValidationError

from client import SegmentClient, SegmentError
from gradio_ui.settings import build_parser, ui_settings_from_args
from server.settings import Settings, validation_problems

log = logging.getLogger("gradio_ui.launch")

HEALTH_WAIT_S = 600.0  # a first start may download the pretrained weights


def _interrupt(signum: int, frame: FrameType | None) -> None:
    # SIGTERM does what Ctrl-C does, so Gradio closes its server thread and the finally below runs.
    raise KeyboardInterrupt


def wait_until_serving(server: subprocess.Popen[bytes], target: str, timeout: float = HEALTH_WAIT_S) -> bool:
    """True once the server answers SERVING; False if it exits or the time runs out."""
    deadline = time.monotonic() + timeout
    next_note = time.monotonic() + 10
    with SegmentClient(target) as client:
        while time.monotonic() < deadline and server.poll() is None:
            try:
                if client.health(timeout=2.0) == "SERVING":
                    return True
            except SegmentError:
                pass
            if time.monotonic() > next_note:
                log.info("still waiting for the server at %s to load its model…", target)
                next_note += 10
            time.sleep(0.3)
    return False


def stop(server: subprocess.Popen[bytes], grace_s: float) -> int:
    try:  # after Ctrl-C the server got SIGINT too and is already on its way out
        return server.wait(2)
    except subprocess.TimeoutExpired:
        server.send_signal(signal.SIGTERM)
    try:
        return server.wait(grace_s + 10)
    except subprocess.TimeoutExpired:
        server.kill()
        return server.wait()


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser("python -m gradio_ui.launch", "segserve's server and Gradio page together.")
    try:
        server_settings = Settings()
        ui = ui_settings_from_args(argv, parser)
    except ValidationError as exc:
        print(f"segserve: invalid settings: {validation_problems(exc)}", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if "target" not in ui.model_fields_set:
        if server_settings.port == 0:
            print("segserve: make run needs a fixed SEGSERVE_PORT, not 0", file=sys.stderr)
            return 2
        ui = ui.model_copy(update={"target": f"localhost:{server_settings.port}"})
    signal.signal(signal.SIGTERM, _interrupt)
    signal.signal(signal.SIGINT, signal.default_int_handler)  # even when started with SIGINT ignored
    server = subprocess.Popen([sys.executable, "-m", "server"])
    try:
        log.info("waiting for the server at %s to report SERVING…", ui.target)
        if not wait_until_serving(server, ui.target):
            code = server.poll()
            print(f"segserve: the server did not start (exit code {code}); see its log above", file=sys.stderr)
            return 1
        from gradio_ui.app import launch

        print(f"\n  segserve page: http://{ui.host}:{ui.port}  (server {ui.target}); Ctrl-C stops both\n", flush=True)
        launch(ui)
        return 0
    except KeyboardInterrupt:
        return 130
    finally:
        code = stop(server, server_settings.grace_period_s)
        log.info("server stopped (exit code %s)", code)


if __name__ == "__main__":
    sys.exit(main())
