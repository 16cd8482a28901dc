"""Label map to what callers get: a VOC palette PNG at the input's size, class shares, an overlay."""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
from PIL import Image

from server.labels import Label, voc_palette

_PALETTE = voc_palette()
# Level 1 is several times faster than the default on large masks and barely larger:
# label maps are long runs of one value.
_PNG_LEVEL = 1


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
    total = mask.size[0] * mask.size[1]
    order = np.argsort(-counts, kind="stable")
    return [ClassShare(int(i), labels[i].name, float(counts[i] / total)) for i in order if counts[i] > 0]


def encode_png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", compress_level=_PNG_LEVEL)
    return buffer.getvalue()


def encode_mask_png(mask: Image.Image) -> bytes:
    """A palette PNG whose pixel values are the class ids and whose palette holds the VOC colours."""
    paletted = mask.copy()
    paletted.putpalette(_PALETTE)
    return encode_png(paletted)


_FOREGROUND_LUT = [0] + [255] * 255


def blend_overlay(image: Image.Image, mask: Image.Image, opacity: float) -> Image.Image:
    """The image with each pixel's class colour laid over it; background (class 0) left untouched."""
    paletted = mask.copy()
    paletted.putpalette(_PALETTE)
    blended = Image.blend(image, paletted.convert("RGB"), opacity)
    return Image.composite(blended, image, mask.point(_FOREGROUND_LUT))
