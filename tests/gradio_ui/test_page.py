"""The Gradio page in a real browser: Debian's Chromium driven by Playwright, against a real server.

The page runs as `python -m gradio_ui` in a subprocess, as a user starts it. Screenshots go to each
test's tmp_path. Without /usr/bin/chromium the browser tests skip, unless SEGSERVE_REQUIRE_BROWSER=1
(set by .ci/run, which installs Chromium), where they fail.
"""

from __future__ import annotations

import os
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2
from PIL import Image

from client import ClassShare, SegmentClient, SegmentError, Timing
from gradio_ui import render
from gradio_ui.actions import PageActions
from gradio_ui.errors import describe_error
from server.labels import VOC_CLASSES
from tests.helpers.browser import Page, open_page
from tests.helpers.images import encode, photo_like
from tests.helpers.known_model import CLASS_OF, SHAPE_FLOOR, Shape, iou, render_scene
from tests.helpers.processes import free_port
from tests.helpers.servers import ServerThread, make_settings


@pytest.fixture(scope="module")
def pages(server: ServerThread, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Page, Page]]:
    """One page on the live server, one on a port where nothing listens; started side by side."""
    logs = tmp_path_factory.mktemp("pages")
    live = Page(server.target, logs / "live.log")
    dead = Page(f"127.0.0.1:{free_port()}", logs / "dead.log")
    try:
        live.wait_ready()
        dead.wait_ready()
        yield live, dead
    finally:
        live.stop()
        dead.stop()


@pytest.fixture(scope="module")
def known_page(known_server: ServerThread, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Page]:
    """A page on a server whose model really segments (tests/helpers/known_model.py), so the legend can be judged."""
    page = Page(known_server.target, tmp_path_factory.mktemp("known-page") / "page.log")
    try:
        page.wait_ready()
        yield page
    finally:
        page.stop()


@pytest.mark.slow
def test_segment_one_photo_shows_overlay_legend_and_timing(page, pages, server, cat_photo, tmp_path):
    live, _ = pages
    open_page(page, live.url)
    panel = page.locator("#segserve-model").inner_text()
    engine = " ".join(server.app.pipeline.runtime.description.split()[:2])  # e.g. "onnxruntime 1.32.0"
    assert "deeplabv3_mobilenet_v3_large" in panel and f"runtime\n{engine}" in panel.lower()
    warning = page.locator("#segserve-random-warning")
    assert warning.is_visible() and "random weights" in warning.inner_text()

    page.locator("#segserve-input input[type=file]").set_input_files(str(cat_photo))
    page.locator("#segserve-segment").click()
    page.locator("#segserve-legend-list").wait_for()
    page.get_by_text("Segmented 451x300 image").wait_for()
    page.screenshot(path=str(tmp_path / "one-photo.png"), full_page=True)

    rows = page.locator(".segserve-legend-row")
    names = [rows.nth(i).get_attribute("data-class") for i in range(rows.count())]
    fractions = [float(rows.nth(i).get_attribute("data-fraction")) for i in range(rows.count())]
    assert names and set(names) <= set(VOC_CLASSES)
    assert sum(fractions) == pytest.approx(1.0, abs=0.01)
    assert fractions == sorted(fractions, reverse=True)
    assert rows.first.is_visible()

    overlay = page.locator("#segserve-overlay img")
    overlay.wait_for()
    assert overlay.evaluate("img => [img.naturalWidth, img.naturalHeight]") == [451, 300]
    timing = page.locator("#segserve-timing-chips").inner_text()
    assert "inference" in timing and "batch size" in timing and "queue" in timing


@pytest.mark.slow
def test_legend_names_the_classes_in_the_picture(page, known_page, known_server, tmp_path):
    """The page's examples are photos, which the known-answer model cannot read; a synthetic scene it can.
    Each share shown is the share of the server's mask for the same file (on any CPU), and that mask puts
    each class where it was drawn."""
    shapes = [
        Shape("red", "disc", cx=0.25, cy=0.32, size=0.22),
        Shape("blue", "box", cx=0.7, cy=0.68, size=0.2),
        Shape("green", "disc", cx=0.25, cy=0.75, size=0.19),
    ]
    pixels, truth = render_scene(320, 240, shapes, seed=5)
    scene = tmp_path / "scene.png"
    Image.fromarray(pixels).save(scene)
    open_page(page, known_page.url)
    assert not page.locator("#segserve-random-warning").is_visible()
    page.locator("#segserve-input input[type=file]").set_input_files(str(scene))
    page.locator("#segserve-segment").click()
    page.get_by_text("Segmented 320x240 image").wait_for()
    page.screenshot(path=str(tmp_path / "known-scene.png"), full_page=True)

    rows = page.locator(".segserve-legend-row")
    shown = {rows.nth(i).locator(".segserve-name").inner_text(): rows.nth(i) for i in range(rows.count())}
    assert {"__background__", "person", "boat", "pottedplant"} <= shown.keys(), sorted(shown)
    with SegmentClient(known_server.target, timeout=60) as client:
        mask = client.segment(scene.read_bytes()).mask
    for colour, index in CLASS_OF.items():
        name = VOC_CLASSES[index]
        share = float(shown[name].get_attribute("data-fraction"))
        assert share == pytest.approx(float((mask == index).mean()), abs=5e-4), (colour, name, share)
        assert iou(mask, truth, index) >= SHAPE_FLOOR, (colour, name)
        assert shown[name].is_visible()


@pytest.mark.slow
def test_many_photos_arrive_in_a_gallery_and_a_bad_file_is_named(page, pages, cat_photo, tmp_path):
    live, _ = pages
    other = tmp_path / "blobs.png"
    other.write_bytes(encode(photo_like(120, 90, seed=3)))
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(cat_photo.read_bytes()[:400])
    open_page(page, live.url)
    page.get_by_role("tab", name="Many photos").click()
    page.locator("#segserve-files input[type=file]").set_input_files([str(cat_photo), str(other), str(broken)])
    page.locator("#segserve-segment-all").click()
    page.get_by_text("3 of 3 images done, 1 failed.").wait_for()
    page.screenshot(path=str(tmp_path / "many-photos.png"), full_page=True)

    error = page.get_by_text("“broken.jpg” is not an image we can read")
    assert error.is_visible()
    assert page.locator("#segserve-gallery img").count() == 2
    assert page.get_by_text("blobs.png:").first.is_visible()


@pytest.mark.slow
def test_undecodable_photo_is_a_readable_error(page, pages, cat_photo, tmp_path):
    live, _ = pages
    truncated = tmp_path / "truncated.jpg"
    truncated.write_bytes(cat_photo.read_bytes()[:2000])  # a valid header, then nothing
    open_page(page, live.url)
    page.locator("#segserve-input input[type=file]").set_input_files(str(truncated))
    page.locator("#segserve-segment").click()
    error = page.locator("#segserve-status .segserve-error")
    error.wait_for()
    page.screenshot(path=str(tmp_path / "bad-image.png"), full_page=True)
    assert error.inner_text().startswith("That file is not an image we can read:")
    assert "Traceback" not in page.content()


@pytest.mark.slow
def test_a_file_that_is_not_an_image_is_a_readable_error(page, pages, tmp_path):
    live, _ = pages
    notes = tmp_path / "notes.jpg"
    notes.write_text("these are words, not pixels\n")
    open_page(page, live.url)
    page.locator("#segserve-input input[type=file]").set_input_files(str(notes))
    page.locator("#segserve-segment").click()
    error = page.locator("#segserve-status .segserve-error")
    error.wait_for()
    assert (
        error.inner_text().strip()
        == "“notes.jpg” is not an image we can read: send a JPEG, PNG, WebP, GIF, BMP or TIFF."
    )
    page.screenshot(path=str(tmp_path / "not-an-image.png"), full_page=True)
    assert error.is_visible()
    assert "Traceback" not in page.content()


@pytest.mark.slow
def test_server_down_is_a_readable_error(page, pages, cat_photo, tmp_path):
    _, dead = pages
    target = dead.process.args[dead.process.args.index("--target") + 1]  # type: ignore[union-attr]
    expected = f"Cannot reach the segmentation server at {target} — is it running?"
    open_page(page, dead.url)
    assert page.locator("#segserve-model").inner_text().strip() == expected

    page.locator("#segserve-input input[type=file]").set_input_files(str(cat_photo))
    page.locator("#segserve-segment").click()
    error = page.locator("#segserve-status .segserve-error")
    error.wait_for()
    page.screenshot(path=str(tmp_path / "server-down.png"), full_page=True)
    assert error.inner_text().strip() == expected
    assert error.is_visible()
    assert "Traceback" not in page.content()


# -- without a browser -------------------------------------------------------------------------------


def test_a_server_that_says_not_serving_reads_as_up_but_not_ready(tmp_path: Path):
    """The client sends nothing to a server whose health says NOT_SERVING (loading, or draining): the page
    must still tell that apart from a server that is not there."""
    loading = ServerThread(make_settings())
    photo = tmp_path / "photo.png"
    photo.write_bytes(encode(photo_like(64, 48)))
    actions = PageActions(loading.target, timeout_s=30)
    try:
        loading.call(loading.app.health.set("segserve.v1.Segmenter", health_pb2.HealthCheckResponse.NOT_SERVING))
        panel = actions.panel(actions.model_info())
        *_, status, _ = actions.segment_one(str(photo), 512, 0.5)
        assert actions.client.health() == "NOT_SERVING"
    finally:
        actions.close()
        loading.stop()
    assert f"The server at {loading.target} is up but not serving yet" in panel
    assert f"The server at {loading.target} is up but not ready (no replica is serving" in status


def test_too_large_image_is_a_readable_error(server: ServerThread, tmp_path: Path):
    huge = tmp_path / "huge.png"
    Image.new("L", (8000, 7000)).save(huge)  # 56 million pixels, over the 50 million default, a small file
    actions = PageActions(server.target, timeout_s=30)
    try:
        overlay, mask, legend, _, status, panel = actions.segment_one(str(huge), 512, 0.5)
    finally:
        actions.close()
    assert overlay is None and mask is None and legend == ""
    assert "Image too large: image is 8000x7000 = 56000000 pixels" in status
    assert "segserve-error" in status
    assert "deeplabv3" in panel


@pytest.mark.parametrize(
    ("code", "message", "reachable", "expected"),
    [
        (grpc.StatusCode.UNAVAILABLE, "failed to connect", False, "Cannot reach the segmentation server at h:1"),
        (grpc.StatusCode.UNAVAILABLE, "model is still loading", True, "is up but not ready (model is still loading)"),
        (grpc.StatusCode.INVALID_ARGUMENT, "cannot decode image: x", False, "not an image we can read: cannot decode"),
        (grpc.StatusCode.INVALID_ARGUMENT, "max_size must be 0", False, "The server refused the options"),
        (grpc.StatusCode.RESOURCE_EXHAUSTED, "image is 9 bytes; the limit", False, "Image too large: image is 9"),
        (grpc.StatusCode.RESOURCE_EXHAUSTED, "server busy: 64 requests", False, "The server is busy"),
        (grpc.StatusCode.INTERNAL, "internal error", False, "failed: INTERNAL: internal error"),
    ],
)
def test_errors_read_as_sentences(code, message, reachable, expected):
    assert expected in describe_error(SegmentError(code, message), "h:1", reachable=reachable)


def test_legend_lists_classes_largest_first_with_their_colours():
    html = render.legend(
        [ClassShare(0, "__background__", 0.25), ClassShare(8, "cat", 0.75)], {0: "#000000", 8: "#400000"}
    )
    assert html.index('data-class="cat"') < html.index('data-class="__background__"')
    assert "background:#400000" in html and "75.0%" in html and ">__background__<" in html
    chips = render.timing(Timing(1, 2, 3, 4, 10, 2), (64, 48), (640, 480))
    assert "batch size</b> 2" in chips and "640x480" in chips


@pytest.mark.slow
def test_launcher_starts_server_then_page_and_ctrl_c_stops_both(tmp_path: Path):
    """`make run`: the server first, the page once it is SERVING; SIGINT stops both."""
    import signal

    from client import SegmentClient

    server_port, page_port = free_port(), free_port()
    env = {
        **os.environ,
        "SEGSERVE_HOST": "127.0.0.1",
        "SEGSERVE_PORT": str(server_port),
        "SEGSERVE_WEIGHTS": "random",
        "SEGSERVE_DEVICE": "cpu",
        "SEGSERVE_MAX_SIZE": "64",
        "SEGSERVE_GRACE_PERIOD_S": "1",
        "SEGSERVE_UI_PORT": str(page_port),
        "GRADIO_ANALYTICS_ENABLED": "False",
    }
    env.pop("SEGSERVE_UI_TARGET", None)
    log = tmp_path / "launch.log"
    launcher = subprocess.Popen(
        [sys.executable, "-m", "gradio_ui.launch"], env=env, stdout=log.open("wb"), stderr=subprocess.STDOUT
    )
    page = Page.__new__(Page)
    page.url, page.log, page.process = f"http://127.0.0.1:{page_port}/", log, launcher
    try:
        page.wait_ready()
        with SegmentClient(f"127.0.0.1:{server_port}") as client:
            assert client.health() == "SERVING"  # the page came up after the server's health said so
        launcher.send_signal(signal.SIGINT)
        assert launcher.wait(30) in (0, 130), log.read_text()  # 130: interrupted while the page was starting
    finally:
        if launcher.poll() is None:
            launcher.kill()
            launcher.wait()
    with SegmentClient(f"127.0.0.1:{server_port}") as client, pytest.raises(SegmentError):
        client.health(timeout=1)
    with pytest.raises(OSError):
        urllib.request.urlopen(page.url, timeout=2)
    assert "server stopped (exit code 0)" in log.read_text()


def test_readme_documents_every_page_setting():
    from gradio_ui.settings import UISettings

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    for name, field in UISettings.model_fields.items():
        rows = [line for line in readme.splitlines() if line.startswith(f"| `SEGSERVE_UI_{name.upper()}` |")]
        assert rows and f"`--{name.replace('_', '-')}`" in rows[0] and f"`{field.default}`" in rows[0], name
