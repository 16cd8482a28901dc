"""Test images made in code: photo-like pictures, odd formats, headers that lie about their size."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
from PIL import Image


def encode(image: Image.Image, fmt: str = "PNG", **params: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **params)
    return buffer.getvalue()


def photo_like(width: int, height: int, seed: int = 0) -> Image.Image:
    """A smooth, photo-like RGB image (gradients plus blobs), deterministic per seed."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    channels = []
    for _ in range(3):
        fx, fy, phase = [*rng.uniform(0.5, 4, 2).tolist(), rng.uniform(0, 6.28)]
        channels.append(
            127 + 120 * np.sin(x / max(width, 1) * fx * 6.28 + phase) * np.cos(y / max(height, 1) * fy * 6.28)
        )
    return Image.fromarray(np.stack(channels, axis=-1).clip(0, 255).astype(np.uint8))


def png_declaring(width: int, height: int) -> bytes:
    """A valid 1x1 PNG whose header is rewritten to claim width x height: a few dozen bytes."""
    data = bytearray(encode(Image.new("L", (1, 1))))
    ihdr = 8 + 8  # signature, then the IHDR chunk's length and type
    data[ihdr : ihdr + 8] = struct.pack(">II", width, height)
    crc = zlib.crc32(bytes(data[ihdr - 4 : ihdr + 13]))
    data[ihdr + 13 : ihdr + 17] = struct.pack(">I", crc)
    return bytes(data)


def cmyk_jpeg() -> bytes:
    return encode(photo_like(64, 48).convert("CMYK"), "JPEG")


def png16() -> bytes:
    ramp = np.tile(np.linspace(0, 65535, 80), (40, 1)).astype(np.uint16)
    image = Image.fromarray(ramp)
    assert image.mode.startswith("I;16")
    return encode(image)


def animated_gif() -> bytes:
    frames = [photo_like(40, 30, seed=i).convert("P") for i in range(3)]
    data = encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)
    assert getattr(Image.open(io.BytesIO(data)), "n_frames", 1) == 3
    return data
