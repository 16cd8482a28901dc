"""Decoded-image memory for every mode Pillow opens (issue 40, point 2), and the pixels each mode becomes.

The memory tests decode a 4000x4000 image of each mode in a child process of its own and read the child's peak
resident memory (Linux's VmHWM, reset just before the decode by writing 5 to /proc/self/clear_refs) against its
resident memory before: Pillow's image memory is allocated outside Python's allocators, so tracemalloc would
not see it, and a fresh process has freed nothing large that the decode could reuse unseen. The bound is what
the decoded image itself takes in Pillow plus twice width x height x 3 (the RGB result, which Pillow stores in
4 bytes a pixel, and room for the conversion), plus a fixed allowance for the decoders' buffers.

Run as a module (`python -m tests.core.test_imaging_modes < FILE`), it is that child: it prints the peak
growth of decoding the image file on its standard input, in bytes.
"""

from __future__ import annotations

import io
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from server.core.imaging import Limits, _tiles, decode_image, let_pillow_accept, to_rgb

ROOT = Path(__file__).resolve().parents[2]
SIDE = 4000
LIMITS = Limits(max_bytes=1 << 30, max_pixels=50_000_000)  # the default pixel limit
MIB = 1024 * 1024
# Decoder buffers, the tiles' temporaries and the interpreter's own growth while decoding.
ALLOWANCE = 16 * MIB
# Bytes a pixel of each mode takes in Pillow's memory (its "1", L and P use a byte, I;16 two, the rest four).
PILLOW_BYTES_PER_PIXEL = {"1": 1, "L": 1, "P": 1, "I;16": 2, "I;16B": 2}


def _gradients(width: int, height: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Smooth 8-bit, 8-bit alpha and 16-bit gradients: cheap to make and to compress."""
    x = np.arange(width, dtype=np.uint32)[None, :]
    y = np.arange(height, dtype=np.uint32)[:, None]
    g8 = ((x + y) % 256).astype(np.uint8)
    alpha = np.broadcast_to(((x // 3) % 256).astype(np.uint8), (height, width)).copy()
    g16 = ((x * 16 + y) % 65536).astype(np.uint16)
    return g8, alpha, g16


def _palette(indices: np.ndarray, alpha: np.ndarray | None = None) -> Image.Image:
    """P (or PA, given an alpha) from palette indices; Image.merge does not make P bands from L."""
    image = Image.frombytes("P", (indices.shape[1], indices.shape[0]), indices.tobytes())
    image.putpalette([(i * k) % 256 for i in range(256) for k in (1, 3, 7)])
    if alpha is not None:
        image = image.convert("PA")
        image.putalpha(Image.fromarray(alpha))
    return image


def image_file(case: str, width: int, height: int) -> bytes:
    """An image file of width x height whose decoded mode is `case` (the case names a format where one mode
    comes in several)."""
    g8, alpha, g16 = _gradients(width, height)
    grey, a = Image.fromarray(g8), Image.fromarray(alpha)
    rgb = Image.merge("RGB", [grey, a, grey.transpose(Image.Transpose.FLIP_LEFT_RIGHT)])
    made: dict[str, tuple[Image.Image, str, dict[str, object]]] = {
        "RGB": (rgb, "PNG", {}),
        "RGB JPEG": (rgb, "JPEG", {"quality": 90}),
        "L": (grey, "PNG", {}),
        "1": (grey.convert("1"), "PNG", {}),
        "P": (_palette(g8), "PNG", {}),
        "P with transparency": (_palette(g8), "PNG", {"transparency": 7}),
        "LA": (Image.merge("LA", [grey, a]), "PNG", {}),
        "RGBA": (Image.merge("RGBA", [*rgb.split(), a]), "PNG", {}),
        "PA": (_palette(g8, alpha), "TIFF", {}),
        "CMYK": (rgb.convert("CMYK"), "TIFF", {}),
        "CMYK JPEG": (rgb.convert("CMYK"), "JPEG", {"quality": 90}),
        "I;16": (Image.fromarray(g16), "PNG", {}),
        # TIFFs uncompressed: Pillow writes I;16B only so (compressed ones come back as I;16), and compressing
        # 32-bit samples takes seconds.
        "I;16B": (Image.fromarray(g16.astype(">u2")), "TIFF", {}),
        "I": (Image.fromarray(g16.astype(np.int32)), "TIFF", {}),
        "F": (Image.fromarray(g16.astype(np.float32)), "TIFF", {}),
    }
    image, fmt, params = made[case]
    buffer = io.BytesIO()
    if fmt == "PNG":
        params = {"compress_level": 1, **params}
    image.save(buffer, format=fmt, **params)
    return buffer.getvalue()


CASES = [
    "RGB",
    "RGB JPEG",
    "L",
    "1",
    "P",
    "P with transparency",
    "LA",
    "RGBA",
    "PA",
    "CMYK",
    "CMYK JPEG",
    "I;16",
    "I;16B",
    "I",
    "F",
]


def _memory_field(field: str) -> int:
    with open("/proc/self/status", encoding="ascii") as status:
        for line in status:
            if line.startswith(field):
                return int(line.split()[1]) * 1024
    raise AssertionError(f"{field} missing from /proc/self/status")


def peak_growth_of_decode(data: bytes) -> int:
    """In this process: the peak resident memory decode_image(data) adds, in bytes."""
    let_pillow_accept(LIMITS.max_pixels)
    with open("/proc/self/clear_refs", "w", encoding="ascii") as clear_refs:
        clear_refs.write("5")  # VmHWM := VmRSS
    before = _memory_field("VmRSS:")
    decoded = decode_image(data, 512, LIMITS)
    peak = _memory_field("VmHWM:")
    assert decoded.model_input.mode == "RGB"
    return peak - before


@pytest.mark.slow
@pytest.mark.parametrize("case", CASES)
def test_decoding_holds_the_image_its_rgb_and_little_more(case: str) -> None:
    data = image_file(case, SIDE, SIDE)
    mode = Image.open(io.BytesIO(data)).mode
    assert mode == case.split()[0], (case, mode)
    child = subprocess.run(
        [sys.executable, "-m", "tests.core.test_imaging_modes"],
        cwd=ROOT,
        input=data,
        capture_output=True,
        timeout=120,
        check=False,
    )
    assert child.returncode == 0, child.stderr.decode(errors="replace")[-2000:]
    growth = int(child.stdout.split()[-1])
    pixels = SIDE * SIDE
    bound = PILLOW_BYTES_PER_PIXEL.get(mode, 4) * pixels + 2 * 3 * pixels + ALLOWANCE
    assert growth <= bound, f"{case}: decoding peaked at +{growth / MIB:.0f} MiB; the bound is {bound / MIB:.0f} MiB"


def _old_to_rgb(image: Image.Image) -> Image.Image:
    """to_rgb as it was before issue 40 (whole-image float64 and copies): the pixels to keep."""
    if image.mode == "RGB":
        return image
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        pixels = np.asarray(image, dtype=np.float64)
        top = 65535.0 if image.mode.startswith("I;16") or pixels.max(initial=0) > 255 else 255.0
        scaled = np.clip(pixels * (255.0 / top), 0, 255).astype(np.uint8)
        return Image.fromarray(scaled).convert("RGB")
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def _noisy(case: str, width: int, height: int) -> Image.Image:
    """The case's image with random pixels (every alpha, every 16-bit value) so that rounding shows."""
    rng = np.random.default_rng(40)
    image = Image.open(io.BytesIO(image_file(case, width, height)))
    image.load()
    if image.mode in ("I;16", "I;16B", "I", "F"):
        values = rng.integers(0, 65536, (height, width))
        if image.mode == "I":
            values[:, :7] = [-5, 0, 255, 65535, 65536, 1 << 20, -(1 << 20)]
        dtype = {"I;16": np.uint16, "I;16B": np.dtype(">u2"), "I": np.int32, "F": np.float32}[image.mode]
        noisy = Image.fromarray(values.astype(dtype))
        if image.mode == "F":
            noisy = Image.fromarray(values.astype(np.float32) + rng.random((height, width), dtype=np.float32))
        assert noisy.mode == image.mode
        return noisy
    if image.mode in ("1", "CMYK"):
        return image
    bands = [rng.integers(0, 256, (height, width), dtype=np.uint8) for _ in image.getbands()]
    if image.mode in ("P", "PA"):
        noisy = _palette(*bands)
    else:
        noisy = Image.merge(image.mode, [Image.fromarray(band) for band in bands])
    noisy.info = dict(image.info)
    return noisy


@pytest.mark.parametrize("case", CASES)
def test_every_mode_keeps_its_pixels(case: str) -> None:
    """Tiling changes no pixel: every mode converts as the whole-image conversion did, 16-bit included
    (v // 257 is the float formula's result for every 16-bit value). Masks follow from these pixels, so they
    stay byte-identical. 700x500 spans two bands of tiles."""
    image = _noisy(case, 700, 500)
    assert np.array_equal(np.asarray(to_rgb(image)), np.asarray(_old_to_rgb(image))), case


def test_eight_bit_images_in_i_and_f_are_not_stretched() -> None:
    values = np.arange(200, dtype=np.int32).reshape(10, 20)
    for image in (Image.fromarray(values), Image.fromarray(values.astype(np.float32))):
        assert np.array_equal(np.asarray(to_rgb(image))[..., 0], values.astype(np.uint8)), image.mode


@pytest.mark.parametrize("size", [(1, 1), (700, 500), (300_000, 1), (1, 300_000), (600_000, 2), (513, 511)])
def test_tiles_cover_the_image_once_and_stay_small(size: tuple[int, int]) -> None:
    covered = np.zeros((size[1], size[0]), dtype=np.uint8)
    for left, top, right, bottom in _tiles(size):
        assert (right - left) * (bottom - top) <= 1 << 18
        covered[top:bottom, left:right] += 1
    assert covered.min() == covered.max() == 1


def test_a_panorama_wider_than_a_tile_converts_whole() -> None:
    values = (np.arange(300_000, dtype=np.uint32) % 65536).astype(np.uint16)[None, :]
    rgb = np.asarray(to_rgb(Image.fromarray(values)))
    assert rgb.shape == (1, 300_000, 3)
    assert np.array_equal(rgb[0, :, 1], (values[0] // 257).astype(np.uint8))


if __name__ == "__main__":
    print(peak_growth_of_decode(sys.stdin.buffer.read()))
