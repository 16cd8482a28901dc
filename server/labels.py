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


MIN_CLASSES = 2
MAX_CLASSES = 256
"""Label maps travel as uint8 (and masks as 8-bit palette PNGs): 256 classes at most."""


def palette_of(labels: tuple[Label, ...]) -> bytes:
    """A 256-entry RGB palette (768 bytes, a PNG's PLTE): the labels' colours, then VOC's for unused indices."""
    palette = voc_palette()
    for label in labels:
        palette[label.index * 3 : label.index * 3 + 3] = label.color
    return bytes(palette)


def parse_color(value: object) -> tuple[int, int, int] | None:
    """'#rrggbb' or [r, g, b] (0-255) to a tuple; None when it is neither."""
    if isinstance(value, str) and len(value) == 7 and value.startswith("#"):
        try:
            return int(value[1:3], 16), int(value[3:5], 16), int(value[5:7], 16)
        except ValueError:
            return None
    if not isinstance(value, list | tuple) or len(value) != 3:
        return None
    if all(isinstance(c, int) and not isinstance(c, bool) and 0 <= c <= 255 for c in value):
        return int(value[0]), int(value[1]), int(value[2])
    return None


def labels_with_colors(names: list[str], colors: list[tuple[int, int, int] | None]) -> tuple[Label, ...]:
    """Labels whose missing colours are generated: VOC's colour map in order (stable from run to run), skipping
    any colour already taken, so every class gets a colour of its own. Raises ValueError on a repeated
    colour or name."""
    taken: set[tuple[int, int, int]] = set()
    for name, color in zip(names, colors, strict=True):
        if color is not None:
            if color in taken:
                raise ValueError(f"colour #{bytes(color).hex()} of {name!r} is given to another class too")
            taken.add(color)
    seen: set[str] = set()
    for name in names:
        if name in seen:
            raise ValueError(f"class name {name!r} appears twice")
        seen.add(name)
    # VOC's map gives 256 distinct colours: enough for every class whatever colours were given.
    spare = (voc_color(i) for i in range(MAX_CLASSES) if voc_color(i) not in taken)
    labels: list[Label] = []
    for index, (name, color) in enumerate(zip(names, colors, strict=True)):
        if color is None:
            color = next(spare)
            taken.add(color)
        labels.append(Label(index, name, color))
    return tuple(labels)
