"""The fast paths of postprocessing must give exactly what the plain ones give."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from server.core import mask_png
from server.core.mask_png import encode_upsampled_mask_png
from server.core.postprocess import (
    VOC_PALETTE,
    class_shares,
    class_shares_of_upsampled,
    encode_mask_png,
    upsample_labels,
)
from server.labels import VOC_CLASSES, make_labels

LABELS = make_labels(VOC_CLASSES)


@pytest.mark.parametrize(
    ("small", "size"),
    [
        ((384, 512), (4000, 3000)),
        ((384, 512), (640, 480)),
        ((7, 5), (13, 29)),
        ((512, 1), (10000, 10)),
        ((3, 3), (3, 3)),
        ((384, 288), (3024, 4032)),
        ((333, 512), (1537, 1001)),
        ((17, 512), (6000, 200)),
    ],
)
def test_weighted_counts_equal_counting_the_upsampled_mask(small: tuple[int, int], size: tuple[int, int]) -> None:
    label_map = np.random.default_rng(sum(small) + sum(size)).integers(0, 21, small).astype(np.uint8)
    expected = class_shares(upsample_labels(label_map, size), LABELS)
    assert class_shares_of_upsampled(label_map, size, LABELS) == expected


def test_mask_png_round_trips_the_class_ids() -> None:
    label_map = np.zeros((48, 64), np.uint8)
    label_map[10:30, 5:40] = 15
    label_map[0, :] = 20
    with Image.open(io.BytesIO(encode_mask_png(upsample_labels(label_map, (64, 48))))) as png:
        assert png.mode == "P"
        assert np.array_equal(np.asarray(png), label_map)


SIZES = [
    ((384, 512), (4000, 3000)),
    ((512, 384), (3000, 4000)),
    ((384, 512), (640, 480)),
    ((7, 5), (13, 29)),
    ((512, 1), (10000, 10)),
    ((1, 512), (10, 10000)),
    ((3, 3), (3, 3)),
    ((333, 512), (1537, 1001)),
    ((17, 512), (6000, 200)),
]


def _decoded(png: bytes) -> tuple[np.ndarray, list[int] | None, str]:
    with Image.open(io.BytesIO(png)) as image:
        image.load()  # a corrupt stream or a wrong Adler-32 fails here
        return np.asarray(image), image.getpalette(), image.mode


@pytest.mark.parametrize(("small", "size"), SIZES)
@pytest.mark.parametrize("kind", ["noise", "regions"])
def test_the_direct_png_has_the_pixels_and_palette_of_the_upsampled_mask(
    small: tuple[int, int], size: tuple[int, int], kind: str
) -> None:
    """Every pixel equal to Pillow's nearest-neighbour upsampling, on noise (every row differs) and on the
    large flat regions real masks have (long runs of identical rows and bytes)."""
    rng = np.random.default_rng(sum(small) + sum(size))
    if kind == "noise":
        label_map = rng.integers(0, 21, small).astype(np.uint8)
    else:
        label_map = np.zeros(small, np.uint8)
        label_map[small[0] // 4 : small[0] // 2, small[1] // 3 :] = 15
        label_map[small[0] // 2 :, : small[1] // 2] = 20
    expected = _decoded(encode_mask_png(upsample_labels(label_map, size)))
    got = _decoded(encode_upsampled_mask_png(label_map, size, VOC_PALETTE))
    assert got[2] == expected[2] == "P"
    assert got[1] == expected[1]
    assert got[0].shape == (size[1], size[0])
    assert np.array_equal(got[0], expected[0])


def test_the_served_path_picks_the_direct_png_for_large_upsampling_only(monkeypatch: pytest.MonkeyPatch) -> None:
    used: list[str] = []
    real = mask_png.encode_upsampled_mask_png
    monkeypatch.setattr(mask_png, "encode_upsampled_mask_png", lambda *a: used.append("direct") or real(*a))
    label_map = np.zeros((384, 512), np.uint8)
    mask_png.mask_png_and_shares(label_map, (4000, 3000), VOC_PALETTE, LABELS)
    mask_png.mask_png_and_shares(label_map, (640, 480), VOC_PALETTE, LABELS)
    assert used == ["direct"]


@pytest.mark.parametrize("size", [(4000, 3000), (640, 480), (512, 384)])
def test_the_served_paths_shares_and_png_are_the_plain_ones(size: tuple[int, int]) -> None:
    # Both paths: the direct PNG with the weighted count (4000x3000), the full-size mask and its histogram.
    label_map = np.random.default_rng(size[0]).integers(0, 21, (384, 512)).astype(np.uint8)
    label_map[:200, :300] = 0  # a large share of one class, as real masks have
    png, shares = mask_png.mask_png_and_shares(label_map, size, VOC_PALETTE, LABELS)
    mask = upsample_labels(label_map, size)
    assert shares == class_shares(mask, LABELS)
    assert np.array_equal(_decoded(png)[0], np.asarray(mask))
