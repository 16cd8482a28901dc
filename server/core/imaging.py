"""Decoding and resizing: bytes in, an RGB image at model size out. No torch here."""

from __future__ import annotations

import io
import re
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from server.errors import ImageTooLarge, InvalidImage

# A truncated file is the caller's error to hear about, not something to paper over with grey.
ImageFile.LOAD_TRUNCATED_IMAGES = False

# JPEG orientations 5-8 swap width and height.
_SWAPPING_ORIENTATIONS = {5, 6, 7, 8}

# Pillow only warns between MAX_IMAGE_PIXELS and twice that. Its check also runs while loading (GIF
# frames, TIFF tiles, icon sizes), where ours on the header cannot look, so the warning is made an
# error here, once for the process: warnings.catch_warnings in worker threads would swap the
# process-wide filters under every other thread.
warnings.filterwarnings("error", category=Image.DecompressionBombWarning)


@dataclass(frozen=True)
class Limits:
    max_bytes: int
    max_pixels: int


def let_pillow_accept(max_pixels: int) -> None:
    """Raises Pillow's process-wide pixel limit (about 89 MP) to ours, so that a higher limit works and
    our check on the header decides, and says, what is too large. Call once per server, at start.

    Only ever raised, never lowered: servers with different limits may share a process (tests do).
    """
    if Image.MAX_IMAGE_PIXELS is not None and max_pixels > Image.MAX_IMAGE_PIXELS:
        Image.MAX_IMAGE_PIXELS = max_pixels


@dataclass
class DecodedImage:
    """An RGB image ready for the model, plus what postprocessing needs to map back."""

    model_input: Image.Image
    """RGB, longer side at most max_size."""
    original_size: tuple[int, int]
    """(width, height) after EXIF orientation: the size of the mask."""
    full_image: Image.Image | None = None
    """RGB at original_size, kept only when an overlay was asked for."""


def fit_within(size: tuple[int, int], max_side: int) -> tuple[int, int]:
    """Shrink (width, height) so the longer side is at most max_side, keeping the aspect ratio.

    Never upscales and never returns a side of 0, so a 10000x10 panorama becomes 512x1.
    """
    width, height = size
    longer = max(width, height)
    if longer <= max_side:
        return width, height
    scale = max_side / longer
    return max(1, round(width * scale)), max(1, round(height * scale))


def _open(data: bytes, limits: Limits) -> Image.Image:
    if not data:
        raise InvalidImage("image is empty (0 bytes)")
    if len(data) > limits.max_bytes:
        raise ImageTooLarge(f"image is {len(data)} bytes; the limit is {limits.max_bytes} bytes")
    try:
        image = Image.open(io.BytesIO(data))
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        # Pillow's message names its own limit, not ours; say what the image declares and what we accept.
        declared = re.search(r"\((\d+) pixels\)", str(exc))
        what = f"it declares {declared[1]} pixels" if declared else str(exc)
        raise ImageTooLarge(
            f"image refused as a decompression bomb: {what}; the limit is {limits.max_pixels} pixels"
        ) from None
    except UnidentifiedImageError:
        raise InvalidImage(
            f"cannot identify image format ({len(data)} bytes starting {data[:8]!r}); "
            "send JPEG, PNG, WebP, GIF, BMP or TIFF"
        ) from None
    except Exception as exc:  # Pillow raises many types for corrupt headers
        raise InvalidImage(f"cannot read image header: {exc}") from None
    width, height = image.size
    if width < 1 or height < 1:
        raise InvalidImage(f"image has no pixels ({width}x{height})")
    if width * height > limits.max_pixels:
        raise ImageTooLarge(
            f"image is {width}x{height} = {width * height} pixels; the limit is {limits.max_pixels} pixels"
        )
    return image


def _orientation(image: Image.Image) -> int:
    try:
        return int(image.getexif().get(0x0112, 1))
    except Exception:
        return 1


def _oriented_size(image: Image.Image) -> tuple[int, int]:
    width, height = image.size
    return (height, width) if _orientation(image) in _SWAPPING_ORIENTATIONS else (width, height)


# Modes holding more than 8 bits a sample: their values are scaled to 0-255 (see _to_8bit).
_WIDE_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I", "F")
# Modes with an alpha band (or a palette with transparency, made RGBA): composited onto white.
_ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")
# Pixels converted at a time by the tiled paths: a tile's temporaries (a few copies of it, at most 8 bytes a
# pixel) stay a few megabytes whatever the image's size, so a conversion holds the decoded image, the RGB
# result and little more.
_TILE_PIXELS = 1 << 18


def _tiles(size: tuple[int, int]) -> Iterator[tuple[int, int, int, int]]:
    """Boxes of at most _TILE_PIXELS covering the image: bands of whole rows, split across when a row alone
    is longer (a 50-megapixel panorama one row high)."""
    width, height = size
    tile_width = min(width, _TILE_PIXELS)
    rows = max(1, _TILE_PIXELS // tile_width)
    for top in range(0, height, rows):
        for left in range(0, width, tile_width):
            yield left, top, min(left + tile_width, width), min(top + rows, height)


def _tiled_rgb(image: Image.Image, convert: Callable[[Image.Image], Image.Image]) -> Image.Image:
    """`convert` (a per-pixel conversion to RGB) applied tile by tile into one RGB image, so that its
    intermediate images are tile-sized rather than the image's size. Per pixel, so the pixels are those
    of converting the whole image at once."""
    rgb = Image.new("RGB", image.size, None)  # not filled: every pixel is pasted over
    for box in _tiles(image.size):
        rgb.paste(convert(image.crop(box)), box[:2])
    return rgb


def _wide_top(image: Image.Image) -> int:
    """The value that becomes 255: 65535 for 16-bit modes, and for I and F images using more than 8 bits
    (a 16-bit file read as I); 255 for I and F images whose values fit in 8 bits."""
    if image.mode.startswith("I;16"):
        return 65535
    extrema = image.getextrema()
    assert isinstance(extrema[1], int | float)
    return 65535 if extrema[1] > 255 else 255


def _to_8bit(tile: Image.Image, top: int) -> Image.Image:
    """One tile of a wide mode as L: value * 255 / top, clipped to 0-255 and rounded down. Integers take an
    integer path (v // 257 is exactly the float formula's result for every 16-bit value); F tiles compute
    in float64, a tile at a time, with NaN as 0."""
    pixels = np.asarray(tile)
    if pixels.dtype.kind in "iu":
        clipped = np.clip(pixels, 0, top)
        scaled = clipped // 257 if top == 65535 else clipped
    else:
        values = np.nan_to_num(pixels.astype(np.float64), nan=0.0)
        scaled = np.clip(values * (255.0 / top), 0, 255)
    return Image.fromarray(scaled.astype(np.uint8))  # 2-D uint8: mode L


def _composited_on_white(tile: Image.Image) -> Image.Image:
    rgba = tile.convert("RGBA")
    background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(background, rgba).convert("RGB")


def to_rgb(image: Image.Image) -> Image.Image:
    """Any Pillow mode to 8-bit RGB; transparency is composited onto white, and modes of more than 8 bits
    (I;16, I, F) are scaled so that their top value (see _wide_top) becomes 255.

    Bounded memory for every mode: what it holds beyond the decoded image is the RGB result plus a tile's
    temporaries. The conversions that need intermediates (scaling wide modes, compositing alpha) run tile
    by tile, since over the whole image they would cost several times the image (a 16-bit image scaled
    through float64 arrays took 8 bytes a pixel per copy). Other modes are Pillow's own one-step convert.
    """
    if image.mode == "RGB":
        return image
    if image.mode in _WIDE_MODES:
        top = _wide_top(image)
        return _tiled_rgb(image, lambda tile: _to_8bit(tile, top).convert("RGB"))
    if image.mode in _ALPHA_MODES or (image.mode == "P" and "transparency" in image.info):
        return _tiled_rgb(image, _composited_on_white)
    return image.convert("RGB")


def decode_image(data: bytes, max_side: int, limits: Limits, keep_full: bool = False) -> DecodedImage:
    """Decode, orient and shrink an image for the model.

    JPEGs use Pillow's draft mode, so a 12-megapixel photo decodes at 1/2, 1/4 or 1/8 scale
    instead of at full size, unless keep_full asks for the full-resolution image (for overlays).
    """
    image = _open(data, limits)
    original_size = _oriented_size(image)
    target = fit_within(image.size, max_side)
    try:
        if not keep_full and image.format == "JPEG" and target != image.size:
            image.draft("RGB", target)
        image.load()
        # Only when there is something to undo: without an orientation, exif_transpose returns a copy of the
        # same pixels, a noticeable share of decoding (docs/performance.md, 'Served against the model alone').
        if _orientation(image) not in (0, 1):
            image = ImageOps.exif_transpose(image) or image
        rgb = to_rgb(image)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning, MemoryError) as exc:
        raise ImageTooLarge(f"image too large to decode: {exc}") from None
    except Exception as exc:
        raise InvalidImage(f"cannot decode image: {exc}") from None
    model_size = fit_within(original_size, max_side)
    model_input = rgb if rgb.size == model_size else rgb.resize(model_size, Image.Resampling.BILINEAR)
    full = None
    if keep_full:
        full = rgb if rgb.size == original_size else rgb.resize(original_size, Image.Resampling.BILINEAR)
    return DecodedImage(model_input=model_input, original_size=original_size, full_image=full)


def _pixels_size(pixels: np.ndarray, limits: Limits) -> tuple[int, int]:
    height, width = int(pixels.shape[0]), int(pixels.shape[1])
    if width == 0 or height == 0:
        raise InvalidImage(f"image is {width}x{height} pixels; both sides must be at least 1")
    if width * height > limits.max_pixels:
        raise ImageTooLarge(
            f"image is {width}x{height} = {width * height} pixels; the limit is {limits.max_pixels} pixels"
        )
    return width, height


def image_size(data: bytes | np.ndarray, limits: Limits) -> tuple[int, int]:
    """The (width, height) decoding will find (the mask's size, EXIF orientation applied), from the header
    alone; raises what decoding would for a format it cannot identify or an image over the limits. So a
    request can be refused before any of its images is decoded or reaches the model."""
    if isinstance(data, np.ndarray):
        return _pixels_size(data, limits)
    return _oriented_size(_open(data, limits))


def image_from_pixels(pixels: np.ndarray, max_side: int, limits: Limits) -> DecodedImage:
    """Decoded RGB pixels (height x width x 3, uint8) ready for the model: the same pixel limit and
    shrinking as decode_image, for callers that hold frames rather than files."""
    width, height = _pixels_size(pixels, limits)
    rgb = Image.fromarray(np.ascontiguousarray(pixels, dtype=np.uint8))
    model_size = fit_within((width, height), max_side)
    model_input = rgb if rgb.size == model_size else rgb.resize(model_size, Image.Resampling.BILINEAR)
    return DecodedImage(model_input=model_input, original_size=(width, height))


def decode_full_image(data: bytes, limits: Limits) -> Image.Image:
    """The image at its full, oriented size (for overlays): decoded after the model, not kept while queued."""
    full = decode_image(data, 1 << 30, limits, keep_full=True).full_image
    assert full is not None
    return full
