"""Debian's Chromium driven by Playwright: the flags, and the Gradio page as the tests drive it."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from tests.helpers.processes import free_port

CHROMIUM = Path("/usr/bin/chromium")


CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
]


TIMEOUT_MS = 60_000


class Page:
    """`python -m gradio_ui` on a free port, talking to `target`."""

    def __init__(self, target: str, log: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/"
        self.log = log
        self.process = subprocess.Popen(
            [sys.executable, "-m", "gradio_ui", "--target", target, "--port", str(self.port), "--timeout-s", "60"],
            stdout=log.open("wb"),
            stderr=subprocess.STDOUT,
            env={**os.environ, "GRADIO_ANALYTICS_ENABLED": "False"},
        )

    def wait_ready(self, timeout: float = 90) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.process.poll() is None, f"page exited: {self.log.read_text()}"
            try:
                with urllib.request.urlopen(self.url, timeout=2) as response:
                    if response.status == 200:
                        return
            except OSError:
                time.sleep(0.3)
        raise AssertionError(f"page not up after {timeout}s: {self.log.read_text()}")

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def open_page(page, url: str):  # type: ignore[no-untyped-def]
    page.goto(url)
    page.locator("#segserve-model").wait_for()
    return page
