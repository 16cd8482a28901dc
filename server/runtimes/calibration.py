"""Fixed images a runtime is judged on before it serves, and that int8 calibrates on.

Two sets, deterministic (the same pixels on every machine) and made only of what the project may ship:
scikit-image's bundled sample images (installed with it) and scenes rendered here.

- calibration_images: int8's activation ranges come from these (four photos, four rendered scenes).
- check_images: auto's agreement check compares a lower precision's labels with fp32's on these, each by
  name. Beside the calibration photos and scenes, the hard cases where a lower precision flips whole masks
  first: more photos, dark and near-black ones (a model's margins shrink with the signal), low-contrast
  and washed-out (high-key) ones, crops at other aspect ratios, greyscale, dark and low-contrast scenes.
  A known-answer model lost a near-black photo entirely to int8 (every pixel background) while the pooled
  agreement over the easy images stayed at 99% (docs/performance.md): that is why the check judges each
  image too.
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw

CALIBRATION_PHOTOS = ("astronaut", "chelsea", "coffee", "rocket")
MORE_PHOTOS = ("motorcycle", "retina", "immunohistochemistry", "hubble_deep_field", "camera", "coins")
SCENE_COUNT = 4
_SCENE_SEED = 20261201


def _photo(name: str) -> Image.Image:
    from skimage import data as samples

    pixels = samples.stereo_motorcycle()[0] if name == "motorcycle" else getattr(samples, name)()  # type: ignore[no-untyped-call]
    return Image.fromarray(pixels).convert("RGB")


def _fit(image: Image.Image, width: int, height: int) -> np.ndarray:
    return np.asarray(image.resize((width, height), Image.Resampling.BILINEAR), dtype=np.uint8)


def _landscape(max_size: int) -> tuple[int, int]:
    return max_size, max_size * 3 // 4


def sample_photos(max_size: int, names: tuple[str, ...] = CALIBRATION_PHOTOS) -> list[np.ndarray]:
    """Photos as uint8 HxWx3, one shape (max_size on the long side, 4:3), as the model sees them."""
    return [_fit(_photo(name), *_landscape(max_size)) for name in names]


def rendered_scenes(max_size: int, count: int = SCENE_COUNT, seed: int = _SCENE_SEED) -> list[np.ndarray]:
    """Discs and boxes of strong colours on grainy backgrounds, landscape and portrait: sharp edges and flat
    regions, where a precision that rounds differently shows first."""
    rng = np.random.default_rng(seed)
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


def calibration_images(max_size: int) -> list[np.ndarray]:
    return sample_photos(max_size) + rendered_scenes(max_size)


def _dark(pixels: np.ndarray, gain: float) -> np.ndarray:
    return np.asarray(np.clip(pixels.astype(np.float32) * gain, 0, 255), dtype=np.uint8)


def _low_contrast(pixels: np.ndarray, centre: float = 128.0, spread: float = 0.15) -> np.ndarray:
    return np.asarray(np.clip(centre + (pixels.astype(np.float32) - 128.0) * spread, 0, 255), dtype=np.uint8)


def _high_key(pixels: np.ndarray) -> np.ndarray:
    return np.asarray(np.clip(175.0 + pixels.astype(np.float32) * 0.35, 0, 255), dtype=np.uint8)


def _crop(image: Image.Image, box: tuple[float, float, float, float], width: int, height: int) -> np.ndarray:
    w, h = image.size
    left, top, right, bottom = box
    return _fit(image.crop((int(left * w), int(top * h), int(right * w), int(bottom * h))), width, height)


def check_images(max_size: int) -> list[tuple[str, np.ndarray]]:
    """The agreement check's images, each with the name the log gives it (28)."""
    width, height = _landscape(max_size)
    photos = {name: _fit(_photo(name), width, height) for name in CALIBRATION_PHOTOS + MORE_PHOTOS}
    named: list[tuple[str, np.ndarray]] = list(photos.items())
    named += [(f"scene {k + 1}", scene) for k, scene in enumerate(rendered_scenes(max_size))]
    named += [
        ("chelsea, dark", _dark(photos["chelsea"], 0.25)),
        ("astronaut, dark", _dark(photos["astronaut"], 0.2)),
        ("coffee, near-black", _dark(photos["coffee"], 0.07)),
        ("motorcycle, near-black", _dark(photos["motorcycle"], 0.06)),
        ("rocket, low contrast", _low_contrast(photos["rocket"])),
        ("chelsea, low contrast", _low_contrast(photos["chelsea"], centre=90.0)),
        ("astronaut, high-key", _high_key(photos["astronaut"])),
        ("coffee, high-key", _high_key(photos["coffee"])),
    ]
    square, portrait = (max_size, max_size), (height, width)
    named += [
        ("chelsea, face crop", _crop(_photo("chelsea"), (0.25, 0.0, 0.75, 0.6), *square)),
        ("astronaut, portrait crop", _crop(_photo("astronaut"), (0.2, 0.0, 0.7, 1.0), *portrait)),
        ("coffee, corner crop", _crop(_photo("coffee"), (0.0, 0.3, 0.5, 1.0), *square)),
        ("rocket, portrait crop", _crop(_photo("rocket"), (0.3, 0.0, 0.7, 1.0), *portrait)),
    ]
    dark_scenes = rendered_scenes(max_size, count=2, seed=_SCENE_SEED + 1)
    named += [
        ("scene, dark", _dark(dark_scenes[0], 0.15)),
        ("scene, low contrast", _low_contrast(dark_scenes[1], spread=0.2)),
    ]
    return named
