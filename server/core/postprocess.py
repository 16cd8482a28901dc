"""Label map to what callers get: a VOC palette PNG at the input's size, class shares, an overlay."""

from __future__ import annotations

import io
import zlib
from dataclasses import dataclass

import numpy as np
from PIL import Image

from server.labels import Label, voc_palette

VOC_PALETTE = bytes(voc_palette())
# Label maps are long runs of one value, which run-length deflate suits: on a large mask level 6 was both
# faster than level 1 and smaller (docs/performance.md, 'Figures behind the code's comments').
_PNG_LEVEL = 6
_PNG_STRATEGY = zlib.Z_RLE


@dataclass(frozen=True)
class ClassShare:
    index: int
    name: str
    fraction: float


def upsample_labels(labels: np.ndarray, size: tuple[int, int]) -> Image.Image:
    """An "L" image of class ids at `size`. Nearest-neighbour only: any interpolation of class ids
    would invent classes at edges."""
    mask = Image.fromarray(np.ascontiguousarray(labels, dtype=np.uint8))
    return mask if mask.size == size else mask.resize(size, Image.Resampling.NEAREST)


def class_shares(mask: Image.Image, labels: tuple[Label, ...]) -> list[ClassShare]:
    """Classes present in the mask with their share of its pixels, largest first."""
    counts = np.asarray(mask.histogram()[: len(labels)], dtype=np.int64)
    return _shares(counts, mask.size[0] * mask.size[1], labels)


def _shares(counts: np.ndarray, total: int, labels: tuple[Label, ...]) -> list[ClassShare]:
    """Pixel counts per class to the classes present, largest share first."""
    order = np.argsort(-counts, kind="stable")
    return [ClassShare(int(i), labels[i].name, float(counts[i] / total)) for i in order if counts[i] > 0]


def nearest_sources(out_len: int, in_len: int) -> np.ndarray:
    """Which input index each output index copies under Pillow's nearest-neighbour resize, which steps
    through the input by repeated addition of the scale (so this adds the same way, rounding included)."""
    scale = in_len / out_len
    steps = np.full(out_len, scale)
    steps[0] = scale * 0.5
    sources: np.ndarray = np.floor(np.cumsum(steps)).astype(np.int64)
    return sources


def class_shares_of_upsampled(
    label_map: np.ndarray, size: tuple[int, int], labels: tuple[Label, ...]
) -> list[ClassShare]:
    """class_shares(upsample_labels(label_map, size)) without counting the full-size mask's pixels.

    Each small pixel stands for (rows that copy it) x (columns that copy it) full-size pixels, so a
    weighted count of the small map is exact, and far cheaper than counting a 12-megapixel mask
    (docs/performance.md, 'Speed work: what was tried').
    """
    height, width = label_map.shape
    row_repeats = np.bincount(nearest_sources(size[1], height), minlength=height)
    col_repeats = np.bincount(nearest_sources(size[0], width), minlength=width)
    weights = np.outer(row_repeats, col_repeats).ravel()
    counts = np.bincount(label_map.ravel(), weights=weights, minlength=len(labels))[: len(labels)].astype(np.int64)
    return _shares(counts, size[0] * size[1], labels)


def encode_png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", compress_level=_PNG_LEVEL, compress_type=_PNG_STRATEGY)
    return buffer.getvalue()


def encode_mask_png(mask: Image.Image, palette: bytes = VOC_PALETTE) -> bytes:
    """A palette PNG whose pixel values are the class ids and whose palette holds the class colours."""
    paletted = mask.copy()
    paletted.putpalette(palette)
    return encode_png(paletted)


_FOREGROUND_LUT = [0] + [255] * 255


def blend_overlay(image: Image.Image, mask: Image.Image, opacity: float, palette: bytes = VOC_PALETTE) -> Image.Image:
    """The image with each pixel's class colour laid over it; background (class 0) left untouched."""
    paletted = mask.copy()
    paletted.putpalette(palette)
    blended = Image.blend(image, paletted.convert("RGB"), opacity)
    return Image.composite(blended, image, mask.point(_FOREGROUND_LUT))
