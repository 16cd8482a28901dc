"""PASCAL VOC class names and the standard VOC colour palette."""

from __future__ import annotations

from dataclasses import dataclass

VOC_CLASSES: tuple[str, ...] = (
    "__background__",
    "aeroplane",
    "bicycle",
    "bird",
    "boat",
    "bottle",
    "bus",
    "car",
    "cat",
    "chair",
    "cow",
    "diningtable",
    "dog",
    "horse",
    "motorbike",
    "person",
    "pottedplant",
    "sheep",
    "sofa",
    "train",
    "tvmonitor",
)


def voc_color(index: int) -> tuple[int, int, int]:
    """The VOC devkit's colour map: the bits of the index spread over R, G and B, high bits first."""
    r = g = b = 0
    for shift in range(7, -1, -1):
        r |= ((index >> 0) & 1) << shift
        g |= ((index >> 1) & 1) << shift
        b |= ((index >> 2) & 1) << shift
        index >>= 3
    return r, g, b


def voc_palette() -> list[int]:
    """A flat 256-entry palette for Pillow's putpalette."""
    palette: list[int] = []
    for index in range(256):
        palette.extend(voc_color(index))
    return palette


@dataclass(frozen=True)
class Label:
    index: int
    name: str
    color: tuple[int, int, int]

    @property
    def hex_color(self) -> str:
        return "#{:02x}{:02x}{:02x}".format(*self.color)


def make_labels(names: tuple[str, ...] | list[str]) -> tuple[Label, ...]:
    return tuple(Label(i, name, voc_color(i)) for i, name in enumerate(names))
