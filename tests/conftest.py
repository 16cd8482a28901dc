"""Fixtures every folder uses: a real server on a free port (in a background event loop) and its client, the
known-answer model and a server of it, a test photo, certificates, the browser and its page. Fixtures only: what they
are built from lives in tests/helpers/."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from PIL import Image

from client import SegmentClient
from tests.helpers.browser import CHROMIUM, CHROMIUM_ARGS, TIMEOUT_MS
from tests.helpers.certs import make_certs
from tests.helpers.images import encode, photo_like
from tests.helpers.servers import CONTROL_TOKEN, ServerThread, known_settings, make_settings

# known_model_plugin holds the `known_weights` fixture too: the model is trained before the first test needs it.
pytest_plugins = ["tests.helpers.no_skips", "tests.helpers.known_model_plugin"]

# Servers the tests start (in-process or `python -m server`) take a free HTTP port, never the default 8000,
# which a developer's own server may hold and several test servers would compete for.
os.environ.setdefault("SEGSERVE_HTTP_PORT", "0")
# Model control takes a token (server/dataplane/control_token.py). The tests' servers and clients share one, as an
# operator's do through SEGSERVE_CONTROL_TOKEN; tests of the token itself (tests/models/test_control_token.py)
# set their own. Raw HTTP and tritonclient calls send CONTROL_HEADERS.
os.environ.setdefault("SEGSERVE_CONTROL_TOKEN", CONTROL_TOKEN)


@pytest.fixture(scope="session")
def server() -> Iterator[ServerThread]:
    running = ServerThread(make_settings())
    yield running
    running.stop()


@pytest.fixture(scope="session")
def known_server(known_weights: Path) -> Iterator[ServerThread]:
    """A server whose masks depend on the image: use it for every test that judges a mask."""
    running = ServerThread(known_settings(known_weights))
    yield running
    running.stop()


@pytest.fixture(scope="session")
def client(server: ServerThread) -> Iterator[SegmentClient]:
    with SegmentClient(server.target, timeout=60) as c:
        yield c


@pytest.fixture
def jpeg_bytes() -> bytes:
    return encode(photo_like(160, 120), "JPEG", quality=90)


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A CA, and a server and a client certificate it signed."""
    return make_certs(tmp_path_factory.mktemp("certs"))


@pytest.fixture(scope="module")
def browser() -> Iterator[object]:
    if not CHROMIUM.exists():
        if os.environ.get("SEGSERVE_REQUIRE_BROWSER") == "1":
            pytest.fail(f"{CHROMIUM} is missing; install Debian's chromium package")
        pytest.skip(f"{CHROMIUM} is missing (apt-get install chromium)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True)
        yield chromium
        chromium.close()


@pytest.fixture
def page(browser):  # type: ignore[no-untyped-def]
    context = browser.new_context(viewport={"width": 1400, "height": 1300})
    tab = context.new_page()
    tab.set_default_timeout(TIMEOUT_MS)
    yield tab
    context.close()


@pytest.fixture
def cat_photo(tmp_path: Path) -> Path:
    import skimage.data

    path = tmp_path / "cat.jpg"
    Image.fromarray(skimage.data.chelsea()).save(path, quality=90)
    return path
