"""Masks judged against the known-answer model (tests/helpers/known_model.py): where a shape is, its class must be.

Random weights paint one class over the whole image, so with them EXIF handling, nearest-neighbour
upsampling and batching could all be broken and every mask would still agree with every other. Here the
model really segments coloured shapes, so each test below fails when its feature is broken.
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageOps

from client import SegmentClient
from tests.helpers.images import encode
from tests.helpers.known_model import CLASS_OF, SHAPE_FLOOR, Shape, iou, render_scene
from tests.helpers.servers import KNOWN_MAX_SIZE, ServerThread, known_settings

MIN_IOU = SHAPE_FLOOR
RED_DISC = Shape("red", "disc", cx=0.35, cy=0.45, size=0.28)
# No symmetry a rotation or a flip could map onto itself: three classes in three corners, one corner empty.
ASYMMETRIC = (
    Shape("red", "disc", cx=0.25, cy=0.32, size=0.22),
    Shape("blue", "box", cx=0.7, cy=0.68, size=0.2),
    Shape("green", "disc", cx=0.25, cy=0.75, size=0.19),
)
# Boat (4) and pottedplant (16) touching: any interpolation between them would invent class 10 (cow) at the seam.
ADJACENT = (
    Shape("blue", "box", cx=0.35, cy=0.5, size=0.25),
    Shape("green", "box", cx=0.66, cy=0.5, size=0.18),  # its left edge lies over the blue box's right edge
)
# What EXIF orientations ask for, as Pillow's transposes (the EXIF standard's table; ImageOps.exif_transpose's too).
ORIENTATION_TRANSPOSE = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}


@pytest.fixture(scope="module")
def known(known_server: ServerThread) -> Iterator[SegmentClient]:
    with SegmentClient(known_server.target, timeout=60) as c:
        yield c


def png(pixels: np.ndarray) -> bytes:
    return encode(Image.fromarray(pixels))


def transpose(array: np.ndarray, method: Image.Transpose) -> np.ndarray:
    return np.asarray(Image.fromarray(array).transpose(method))


def present(labels: np.ndarray) -> set[int]:
    return {int(c) for c in np.unique(labels)}


def test_a_red_disc_is_a_person_where_it_was_at_model_size_and_full_size(known: SegmentClient) -> None:
    # At model size: the image is no larger than max_size, so the mask is the model's own output.
    small, small_truth = render_scene(KNOWN_MAX_SIZE, 96, [RED_DISC], seed=1)
    at_model = known.segment(png(small))
    assert at_model.model_size == (KNOWN_MAX_SIZE, 96)
    assert iou(at_model.mask, small_truth, CLASS_OF["red"]) >= MIN_IOU
    # Full size: the server shrinks 600x450 to 128x96, then upsamples the mask back.
    large, large_truth = render_scene(600, 450, [RED_DISC], seed=1)
    full = known.segment(png(large))
    assert full.model_size == (KNOWN_MAX_SIZE, 96) and full.mask.shape == (450, 600)
    assert iou(full.mask, large_truth, CLASS_OF["red"]) >= MIN_IOU
    centre = int(RED_DISC.cy * 450), int(RED_DISC.cx * 600)
    assert full.mask[centre] == CLASS_OF["red"]
    assert [c.name for c in full.classes if c.index == CLASS_OF["red"]] == ["person"]
    person = next(c for c in full.classes if c.name == "person")
    assert person.fraction == pytest.approx(float((full.mask == CLASS_OF["red"]).mean()), abs=1e-6)  # float32


@pytest.mark.parametrize("orientation", sorted(ORIENTATION_TRANSPOSE))
def test_exif_orientation_is_applied_before_the_model(known: SegmentClient, orientation: int) -> None:
    """A JPEG whose EXIF says "turn me": its mask is the mask of the pixels a viewer shows, the turned ones.

    Judged against the server's own answer for those pixels sent without a tag (the same pixels into the
    same model: equal label maps on any CPU); a missing or wrong turn gives another shape or other masks.
    The drawn truth, turned, checks that there is something to compare: every class where it was drawn."""
    upright, truth = render_scene(160, 120, ASYMMETRIC, seed=2)
    method = ORIENTATION_TRANSPOSE[orientation]
    exif = Image.Exif()
    exif[0x0112] = orientation
    tagged = encode(Image.fromarray(upright), "JPEG", quality=95, exif=exif)
    shown = ImageOps.exif_transpose(Image.open(io.BytesIO(tagged)))
    assert shown is not None and shown.size == Image.fromarray(upright).transpose(method).size  # what a viewer shows

    decoded = np.asarray(Image.open(io.BytesIO(tagged)).convert("RGB"))  # the JPEG's pixels, as stored
    expected = known.segment(png(transpose(decoded, method))).mask
    turned_mask = known.segment(tagged).mask
    turned_truth = transpose(truth, method)
    assert turned_mask.shape == expected.shape == turned_truth.shape
    assert np.array_equal(turned_mask, expected)
    for colour, cls in CLASS_OF.items():
        assert iou(turned_mask, turned_truth, cls) >= SHAPE_FLOOR, colour


def test_batched_masks_equal_masks_alone(known_weights: Path) -> None:
    """Same-shaped requests share a batch; no pixel of any mask may depend on its neighbours in the batch."""
    rng = np.random.default_rng(3)
    scenes: list[bytes] = []
    drawn: list[set[int]] = []
    for i in range(12):
        colours = list(CLASS_OF)
        rng.shuffle(colours)
        shapes = [
            Shape(colour, str(rng.choice(["disc", "box"])), cx=cx, cy=float(rng.uniform(0.3, 0.7)), size=0.16)
            for colour, cx in zip(colours[: 2 + i % 2], (0.22, 0.55, 0.82), strict=False)
        ]
        scenes.append(png(render_scene(160, 120, shapes, seed=10 + i)[0]))
        drawn.append({CLASS_OF[shape.colour] for shape in shapes})
    # Adaptive batching off: it could learn that batches do not pay on this CPU and serve them alone.
    server = ServerThread(known_settings(known_weights, adaptive_batching=False, max_batch_size=8))
    try:
        with SegmentClient(server.target, timeout=60) as c:
            alone = [c.segment(scene) for scene in scenes]
            with ThreadPoolExecutor(len(scenes)) as pool:
                together = list(pool.map(c.segment, scenes))
    finally:
        server.stop()
    assert all(r.timing.batch_size == 1 for r in alone)
    assert max(r.timing.batch_size for r in together) > 1, "no batching happened"
    for result, classes in zip(alone, drawn, strict=True):  # masks worth comparing: several classes each
        assert present(result.mask) >= {0, *classes}
    for i, (single, batched) in enumerate(zip(alone, together, strict=True)):
        assert np.array_equal(single.mask, batched.mask), f"scene {i} differs in a batch of {batched.timing.batch_size}"


def test_upsampling_never_invents_classes(known: SegmentClient) -> None:
    """The full-size mask is a nearest-neighbour enlargement of the model's: only classes the model gave."""
    width, height = 500, 375  # 3.9 times the model's 128x96: no integer scale to hide behind
    scene, _ = render_scene(width, height, ADJACENT, seed=4)
    model_size = (KNOWN_MAX_SIZE, 96)
    # The server shrinks with Pillow's bilinear filter; sending the shrunk image gives the model the same input.
    at_model = known.segment(png(np.asarray(Image.fromarray(scene).resize(model_size, Image.Resampling.BILINEAR))))
    full = known.segment(png(scene))
    assert full.model_size == model_size and at_model.model_size == model_size
    small = at_model.mask
    assert {CLASS_OF["blue"], CLASS_OF["green"]} <= present(small)
    seam = small[:, 1:] != small[:, :-1]
    assert (seam & (small[:, 1:] == CLASS_OF["green"]) & (small[:, :-1] == CLASS_OF["blue"])).any()
    assert present(full.mask) <= present(small)
    nearest = np.asarray(Image.fromarray(small).resize((width, height), Image.Resampling.NEAREST))
    assert np.array_equal(full.mask, nearest)
