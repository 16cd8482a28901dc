"""Fixed images a runtime is judged on before it serves: scikit-image's sample photos and rendered scenes.

int8 calibrates its activation ranges on the photos; auto's precision check compares a lower precision's
labels with fp32's on photos and scenes together. Deterministic: the same pixels on every machine.
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw

SAMPLE_PHOTOS = ("astronaut", "chelsea", "coffee", "rocket")
SCENE_COUNT = 4
_SCENE_SEED = 20261201


def sample_photos(max_size: int) -> list[np.ndarray]:
    """The sample photos as uint8 HxWx3, one shape (max_size on the long side, 4:3), as the model sees them."""
    from skimage import data as samples

    width, height = max_size, max_size * 3 // 4
    images = []
    for name in SAMPLE_PHOTOS:
        pixels = getattr(samples, name)()
        image = Image.fromarray(pixels).convert("RGB").resize((width, height), Image.Resampling.BILINEAR)
        images.append(np.asarray(image, dtype=np.uint8))
    return images


def rendered_scenes(max_size: int, count: int = SCENE_COUNT) -> list[np.ndarray]:
    """Discs and boxes of strong colours on grainy backgrounds, landscape and portrait: sharp edges and flat
    regions, where a precision that rounds differently shows first."""
    rng = np.random.default_rng(_SCENE_SEED)
    long, short = max_size, max_size * 3 // 4
    scenes = []
    for k in range(count):
        width, height = (long, short) if k % 2 == 0 else (short, long)
        base = rng.integers(40, 215, size=3)
        grain = rng.normal(0, 12, size=(height, width, 3))
        image = Image.fromarray(np.clip(base + grain, 0, 255).astype(np.uint8))
        draw = ImageDraw.Draw(image)
        for _ in range(int(rng.integers(2, 5))):
            cx, cy = rng.uniform(0.15, 0.85) * width, rng.uniform(0.15, 0.85) * height
            r = rng.uniform(0.08, 0.25) * min(width, height)
            box = (cx - r, cy - r, cx + r, cy + r)
            colour = tuple(int(c) for c in rng.integers(0, 256, size=3))
            (draw.ellipse if rng.random() < 0.5 else draw.rectangle)(box, fill=colour)
        scenes.append(np.asarray(image, dtype=np.uint8))
    return scenes


def agreement_images(max_size: int) -> list[np.ndarray]:
    return sample_photos(max_size) + rendered_scenes(max_size)
