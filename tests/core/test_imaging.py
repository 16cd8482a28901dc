from __future__ import annotations

import io
import warnings

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from server.core.imaging import Limits, decode_image, fit_within, to_rgb
from server.core.pipeline import SegmentationPipeline
from server.errors import ImageTooLarge, InvalidImage
from tests.helpers.images import encode, photo_like, png_declaring
from tests.helpers.servers import make_settings

LIMITS = Limits(max_bytes=32 * 1024 * 1024, max_pixels=50_000_000)


@given(st.integers(1, 100_000), st.integers(1, 100_000), st.integers(16, 2048))
def test_fit_within_keeps_bounds_and_never_upscales(width: int, height: int, max_side: int) -> None:
    w, h = fit_within((width, height), max_side)
    assert 1 <= w <= width and 1 <= h <= height
    assert max(w, h) <= max(max_side, 1)
    if max(width, height) <= max_side:
        assert (w, h) == (width, height)
    else:
        assert max(w, h) == max_side


def test_panorama_never_has_a_zero_side() -> None:
    assert fit_within((10000, 10), 512) == (512, 1)
    decoded = decode_image(encode(Image.new("RGB", (10000, 10), "red")), 512, LIMITS)
    assert decoded.model_input.size == (512, 1)
    assert decoded.original_size == (10000, 10)


def test_exif_rotation_swaps_size() -> None:
    image = photo_like(200, 100)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    decoded = decode_image(encode(image, "JPEG", exif=exif), 64, LIMITS)
    assert decoded.original_size == (100, 200)
    assert decoded.model_input.size == (32, 64)


def test_jpeg_draft_mode_decodes_big_photo_at_reduced_scale(monkeypatch: pytest.MonkeyPatch) -> None:
    big = encode(photo_like(4000, 3000), "JPEG", quality=85)
    loaded_sizes: list[tuple[int, int]] = []
    original_load = Image.Image.load

    def spy(self: Image.Image):  # type: ignore[no-untyped-def]
        result = original_load(self)
        loaded_sizes.append(self.size)
        return result

    monkeypatch.setattr(Image.Image, "load", spy)
    decoded = decode_image(big, 512, LIMITS)
    assert decoded.original_size == (4000, 3000)
    assert decoded.model_input.size == (512, 384)
    assert max(w for w, _ in loaded_sizes) <= 1000, loaded_sizes


@pytest.mark.parametrize(
    "mode",
    ["L", "LA", "P", "RGBA", "CMYK", "I;16", "I", "F", "1"],
)
def test_any_mode_becomes_rgb(mode: str) -> None:
    image = (
        photo_like(40, 30).convert("L").convert(mode)
        if mode in ("I;16", "I", "F", "1")
        else photo_like(40, 30).convert(mode)
    )
    fmt = "TIFF" if mode in ("CMYK", "F", "I") else "PNG"
    decoded = decode_image(encode(image, fmt), 64, LIMITS)
    assert decoded.model_input.mode == "RGB"
    assert decoded.model_input.size == (40, 30)


def test_sixteen_bit_png_keeps_its_contrast() -> None:
    ramp = np.tile(np.linspace(0, 65535, 64), (16, 1)).astype(np.uint16)
    image = Image.fromarray(ramp)
    rgb = np.asarray(to_rgb(Image.open(io.BytesIO(encode(image)))))
    assert rgb[:, 0].max() < 10 and rgb[:, -1].min() > 245


def test_transparent_pixels_become_white() -> None:
    image = Image.new("RGBA", (8, 8), (255, 0, 0, 0))
    assert to_rgb(image).getpixel((0, 0)) == (255, 255, 255)


@pytest.mark.parametrize(
    ("data", "error"),
    [
        (b"", InvalidImage),
        (b"not an image at all", InvalidImage),
        (encode(photo_like(64, 64), "JPEG")[:300], InvalidImage),
        (encode(photo_like(64, 64), "PNG")[:200], InvalidImage),
    ],
    ids=["empty", "text", "truncated-jpeg", "truncated-png"],
)
def test_bad_bytes_are_invalid(data: bytes, error: type[Exception]) -> None:
    with pytest.raises(error) as info:
        decode_image(data, 64, LIMITS)
    assert str(info.value)


def test_byte_and_pixel_limits() -> None:
    data = encode(Image.new("RGB", (300, 300)))
    with pytest.raises(ImageTooLarge, match="bytes"):
        decode_image(data, 64, Limits(max_bytes=len(data) - 1, max_pixels=10**9))
    with pytest.raises(ImageTooLarge, match="pixels"):
        decode_image(data, 64, Limits(max_bytes=10**9, max_pixels=300 * 300 - 1))


def test_decompression_bomb_header_is_refused_before_decoding() -> None:
    # A tiny PNG that declares 30000x30000: refused from the header alone.
    bomb = encode(Image.new("1", (30000, 30000)))
    assert len(bomb) < 200_000
    with pytest.raises(ImageTooLarge):
        decode_image(bomb, 64, LIMITS)


def test_a_pixel_limit_above_pillows_own_is_honoured() -> None:
    """Pillow alone refuses past about 89 MP; SEGSERVE_MAX_IMAGE_PIXELS decides instead, and says so."""
    limits = SegmentationPipeline(make_settings(max_image_pixels=150_000_000)).limits
    # 100 MP declared: within the limit, so not refused as too large (its 1x1 pixel data then fails to decode).
    with pytest.raises(InvalidImage, match="cannot decode"):
        decode_image(png_declaring(10_000, 10_000), 64, limits)
    with pytest.raises(ImageTooLarge, match=r"169000000 pixels; the limit is 150000000 pixels"):
        decode_image(png_declaring(13_000, 13_000), 64, limits)


def test_decoding_leaves_the_process_warning_filters_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    """warnings.catch_warnings swaps the process-wide filter list: from a worker thread, under every other thread."""
    seen: list[object] = []
    real_open = Image.open

    def watching_open(*args, **kwargs):  # type: ignore[no-untyped-def]
        seen.append(warnings.filters)
        return real_open(*args, **kwargs)

    monkeypatch.setattr(Image, "open", watching_open)
    filters = warnings.filters
    decode_image(encode(photo_like(32, 24)), 16, LIMITS)
    assert seen and all(current is filters for current in seen)


VALID_IMAGES = [encode(photo_like(40, 30), fmt) for fmt in ("PNG", "JPEG", "GIF", "BMP", "WEBP")]


def mangled(data: bytes, cut: int, flips: list[tuple[int, int]]) -> bytes:
    """A real image cut short and with some bytes changed: what a broken upload looks like."""
    out = bytearray(data[: max(1, cut)])
    for at, value in flips:
        out[at % len(out)] = value
    return bytes(out)


IMAGE_LIKE = st.one_of(
    st.binary(max_size=2048),
    st.sampled_from(VALID_IMAGES),
    st.builds(
        mangled,
        st.sampled_from(VALID_IMAGES),
        st.integers(1, 4096),
        st.lists(st.tuples(st.integers(0, 4095), st.integers(0, 255)), max_size=4),
    ),
)


@settings(max_examples=120, deadline=None)
@given(IMAGE_LIKE)
def test_any_bytes_decode_to_a_model_input_or_fail_with_one_readable_sentence(data: bytes) -> None:
    try:
        decoded = decode_image(data, 32, LIMITS)  # the valid ones (40x30) must be shrunk
    except (InvalidImage, ImageTooLarge) as exc:
        refusal: str | None = exc.message
    else:
        refusal = None
    if refusal is not None:
        assert refusal.strip() and "\n" not in refusal and "Traceback" not in refusal, refusal
    else:
        image = decoded.model_input
        assert image.mode == "RGB" and min(image.size) >= 1 and max(image.size) <= 32, (image.mode, image.size)
        assert decoded.original_size[0] >= image.size[0] and decoded.original_size[1] >= image.size[1]


def test_the_fuzzed_images_include_ones_that_decode() -> None:
    """So the success branch above is exercised: every unmangled image decodes, shrunk, to an RGB input."""
    for data in VALID_IMAGES:
        decoded = decode_image(data, 32, LIMITS)
        assert decoded.model_input.mode == "RGB" and decoded.model_input.size == (32, 24)
