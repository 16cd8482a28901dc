"""The page's container: started once the server is healthy, and a photo segmented through it in Chromium."""

from __future__ import annotations

import re
import time
import urllib.request
from collections.abc import Callable
from datetime import datetime
from pathlib import Path

from tests.containers.compose import ServerPorts, Stack, free_port, loopback_override

# The page test's own browser helpers (Debian's Chromium through Playwright), not a copy of them.
from tests.helpers.browser import open_page


def _time(stamp: str) -> datetime:
    """Docker's RFC 3339 timestamps carry nanoseconds; Python reads microseconds."""
    match = re.fullmatch(r"([0-9-]+T[0-9:]+)(?:\.(\d+))?(Z|[+-]\d\d:\d\d)", stamp)
    assert match, stamp
    zone = "+00:00" if match[3] == "Z" else match[3]
    return datetime.fromisoformat(f"{match[1]}.{(match[2] or '0')[:6].ljust(6, '0')}{zone}")


def test_the_page_container_segments_a_photo_in_the_browser(
    images: dict[str, str],
    stacks: Callable[..., Stack],
    page,
    cat_photo: Path,
    tmp_path: Path,
) -> None:
    ports, ui_port = ServerPorts(), free_port()
    stack = stacks(loopback_override(images, {"server": ports}, ui_port=ui_port))
    stack.up("ui")  # compose starts the server first and the page once the server's health check passes

    server, ui = stack.inspect("server"), stack.inspect("ui")
    passed = [entry for entry in server["State"]["Health"]["Log"] if entry["ExitCode"] == 0]
    assert passed, server["State"]["Health"]
    assert _time(ui["State"]["StartedAt"]) >= _time(passed[0]["End"]), "the page started before the server was healthy"

    url = f"http://127.0.0.1:{ui_port}/"
    deadline = time.monotonic() + 120
    while True:  # the container runs; Gradio takes a while to listen
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                if response.status == 200:
                    break
        except OSError:
            assert time.monotonic() < deadline, f"the page never answered:\n{stack.logs('ui')}"
            time.sleep(0.5)
    open_page(page, url)
    assert "deeplabv3_mobilenet_v3_large" in page.locator("#segserve-model").inner_text()
    assert "random weights" in page.locator("#segserve-random-warning").inner_text()  # WEIGHTS=random, said so
    page.locator("#segserve-input input[type=file]").set_input_files(str(cat_photo))
    page.locator("#segserve-segment").click()
    page.get_by_text("Segmented 451x300 image").wait_for()
    page.screenshot(path=str(tmp_path / "page-container.png"), full_page=True)
    overlay = page.locator("#segserve-overlay img")
    overlay.wait_for()
    assert overlay.evaluate("img => [img.naturalWidth, img.naturalHeight]") == [451, 300]
    assert page.locator(".segserve-legend-row").count() >= 1
