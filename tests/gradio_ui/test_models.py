"""The page's model dropdown, in Chromium against a server of two models (tests/helpers/model_repository.py): the
known-answer model and its 4-class derivation with its own labels. Whichever model is picked segments, on
every tab, and the legend and the panel show that model's classes and colours."""

from __future__ import annotations

from collections.abc import Iterator
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from client import SegmentClient
from client.video import read_frames
from gradio_ui.actions import PageActions
from gradio_ui.video import VideoActions
from tests.helpers.browser import Page, open_page  # fixtures
from tests.helpers.known_model import CLASS_OF, Shape, render_scene
from tests.helpers.model_repository import build_repository
from tests.helpers.servers import ServerThread, known_settings
from tests.helpers.video_clips import write_shapes_clip

SCENE = [Shape("red", "disc", cx=0.3, cy=0.35, size=0.22), Shape("green", "box", cx=0.7, cy=0.65, size=0.18)]


@pytest.fixture(scope="module")
def two_models(tmp_path_factory: pytest.TempPathFactory, known_weights: Path) -> Iterator[ServerThread]:
    repository = build_repository(tmp_path_factory.mktemp("page-models"), known_weights)
    running = ServerThread(known_settings(known_weights, model_repository=str(repository), default_model="shapes"))
    yield running
    running.stop()


@pytest.fixture(scope="module")
def models_page(two_models: ServerThread, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Page]:
    running = Page(two_models.target, tmp_path_factory.mktemp("models-page") / "page.log")
    try:
        running.wait_ready()
        yield running
    finally:
        running.stop()


def pick_model(tab, name: str) -> None:  # type: ignore[no-untyped-def]
    tab.locator("#segserve-model-choice input").click()
    tab.get_by_role("option", name=name, exact=True).click()
    tab.locator("#segserve-model").get_by_text(name, exact=False).first.wait_for()


def legend_rows(tab) -> dict[str, tuple[str, float]]:  # type: ignore[no-untyped-def]
    rows = tab.locator(".segserve-legend-row")
    shown = {}
    for i in range(rows.count()):
        row = rows.nth(i)
        style = row.locator(".segserve-swatch").get_attribute("style") or ""
        shown[row.locator(".segserve-name").inner_text()] = (style, float(row.get_attribute("data-fraction")))
    return shown


@pytest.mark.slow
def test_the_dropdown_picks_the_model_and_the_legend_shows_its_own_classes(
    page,
    models_page: Page,
    two_models: ServerThread,
    tmp_path: Path,
) -> None:
    pixels, _ = render_scene(320, 240, SCENE, seed=3)
    scene = tmp_path / "scene.png"
    Image.fromarray(pixels).save(scene)
    open_page(page, models_page.url)
    choice = page.locator("#segserve-model-choice input")
    assert choice.input_value() == "shapes"
    assert "NAME\nshapes (default)" in page.locator("#segserve-model").inner_text()

    pick_model(page, "colours")
    panel = page.locator("#segserve-model").inner_text()
    assert "NAME\ncolours\n" in panel and "CLASSES\n4" in panel, panel
    page.locator("#segserve-input input[type=file]").set_input_files(str(scene))
    page.locator("#segserve-segment").click()
    page.get_by_text("Segmented 320x240 image").wait_for()
    page.screenshot(path=str(tmp_path / "colours.png"), full_page=True)
    shown = legend_rows(page)
    assert {"background", "crimson", "leaf"} <= shown.keys() and "person" not in shown, sorted(shown)
    assert "#ff00aa" in shown["crimson"][0] and "#00c800" in shown["leaf"][0]
    with SegmentClient(two_models.target, timeout=60) as client:
        mask = client.segment(scene.read_bytes(), model="colours").mask
    assert shown["crimson"][1] == pytest.approx(float((mask == 1).mean()), abs=5e-4)

    pick_model(page, "shapes")
    page.locator("#segserve-segment").click()
    page.locator(".segserve-legend-row[data-class='person']").wait_for()
    shown = legend_rows(page)
    assert {"person", "pottedplant"} <= shown.keys() and "crimson" not in shown, sorted(shown)


def tint(frames: list[np.ndarray], originals: list[np.ndarray], truths: list[np.ndarray]) -> float:
    """Mean blue-minus-green of the overlay inside the red disc: crimson (#ff00aa) lifts blue over green;
    VOC's person colour (192, 128, 128) lifts both alike."""
    values = []
    for frame, original, truth in zip(frames, originals, truths, strict=True):
        inside = truth == CLASS_OF["red"]
        tinted = frame.astype(float) - original.astype(float) / 2  # the colour half of a 0.5 overlay
        values.append(float((tinted[..., 2] - tinted[..., 1])[inside].mean()))
    return float(np.mean(values))


@pytest.mark.slow
def test_the_video_tab_segments_with_the_model_picked(
    page,
    models_page: Page,
    tmp_path: Path,
) -> None:
    import urllib.request

    clip = tmp_path / "disc.mp4"
    truths = write_shapes_clip(clip, 8, rate=Fraction(8))
    originals = list(read_frames(clip))
    open_page(page, models_page.url)
    pick_model(page, "colours")
    page.get_by_role("tab", name="Video").click()
    page.locator("#segserve-clip input[type=file]").set_input_files(str(clip))
    page.locator("#segserve-clip video").wait_for()
    page.locator("#segserve-segment-clip").click()
    page.locator("#segserve-clip-status .segserve-ok").wait_for()
    download = tmp_path / "download.mp4"
    with urllib.request.urlopen(page.locator("#segserve-clip-out video").get_attribute("src"), timeout=30) as answer:
        download.write_bytes(answer.read())
    assert tint(list(read_frames(download)), originals, truths) > 25


def test_the_live_tab_segments_with_the_model_picked(two_models: ServerThread) -> None:
    """The Live tab's handler (the browser's fake camera is tried in test_gradio_video): the model picked
    colours each frame's overlay."""
    frame, truth = render_scene(160, 120, SCENE, seed=4)
    actions = PageActions(two_models.target, timeout_s=30)
    video = VideoActions(actions.client, actions._describe)
    try:
        tints = {}
        for name in ("colours", "shapes"):
            overlay, stats_html, _ = video.segment_live(frame, 128, 0.5, None, name)
            assert overlay is not None and "frames/s" in stats_html
            tints[name] = tint([overlay], [frame], [truth])
    finally:
        actions.close()
    assert tints["colours"] > 25 and abs(tints["shapes"]) < 10, tints
