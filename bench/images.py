"""The fixed image set: seven 640x480 photos (scikit-image's bundled samples) and one 12-megapixel JPEG."""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
from PIL import Image
from skimage import data as samples

PHOTO_SIZE = (640, 480)
LARGE_SIZE = (4000, 3000)
_SAMPLES = ("astronaut", "chelsea", "coffee", "rocket", "immunohistochemistry", "hubble_deep_field", "retina")
_SEED = 20261122


@dataclass(frozen=True)
class BenchImage:
    name: str
    kind: str
    """"photo" (640x480) or "large" (12 MP)."""
    data: bytes


def _crop_to_4_3(image: Image.Image) -> Image.Image:
    width, height = image.size
    if width * 3 > height * 4:
        new_width = height * 4 // 3
        left = (width - new_width) // 2
        return image.crop((left, 0, left + new_width, height))
    new_height = width * 3 // 4
    top = (height - new_height) // 2
    return image.crop((0, top, width, top + new_height))


def _jpeg(image: Image.Image, quality: int = 90) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def _photo(name: str) -> Image.Image:
    pixels = getattr(samples, name)()
    return _crop_to_4_3(Image.fromarray(pixels).convert("RGB")).resize(PHOTO_SIZE, Image.Resampling.BICUBIC)


def _large_photo(rng: np.random.Generator) -> Image.Image:
    """An upscaled photo with fine grain, so its JPEG weighs what a camera's 12 MP JPEG weighs (several MB)."""
    base = np.asarray(_photo("coffee").resize(LARGE_SIZE, Image.Resampling.BICUBIC), dtype=np.int16)
    grain = rng.integers(-12, 13, size=base.shape, dtype=np.int16)
    return Image.fromarray(np.clip(base + grain, 0, 255).astype(np.uint8))


def image_set() -> list[BenchImage]:
    """Deterministic: the same bytes on every run of the same library versions."""
    rng = np.random.default_rng(_SEED)
    images = [BenchImage(name, "photo", _jpeg(_photo(name))) for name in _SAMPLES]
    images.append(BenchImage("large-12mp", "large", _jpeg(_large_photo(rng))))
    return images
