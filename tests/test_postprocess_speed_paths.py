"""The fast paths of postprocessing must give exactly what the plain ones give."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from server.labels import VOC_CLASSES, make_labels
from server.postprocess import class_shares, class_shares_of_upsampled, encode_mask_png, upsample_labels

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
