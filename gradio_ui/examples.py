"""Example photos: scikit-image's bundled sample photos, written once as JPEGs to a temporary folder.

Only photos whose licence lets anyone reuse them (see skimage.data's docstrings):
astronaut (NASA, public domain), chelsea (Stefan van der Walt, CC0),
coffee (Rachel Michetti, CC0), rocket (SpaceX, public domain).
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path

from PIL import Image

log = logging.getLogger(__name__)

# file name -> (skimage.data function, licence)
EXAMPLES: dict[str, tuple[str, str]] = {
    "astronaut.jpg": ("astronaut", "NASA, public domain"),
    "cat.jpg": ("chelsea", "Stefan van der Walt, CC0"),
    "rocket.jpg": ("rocket", "SpaceX, public domain"),
    "coffee.jpg": ("coffee", "Rachel Michetti, CC0"),
}


def example_folder() -> Path:
    # Under the system temp folder, which Gradio serves files from without extra allowed_paths.
    return Path(tempfile.gettempdir()) / "segserve-ui-examples"


def example_photos(folder: Path | None = None) -> list[Path]:
    """Paths of the example photos, writing the missing ones; [] when scikit-image's data is unavailable."""
    folder = folder or example_folder()
    try:
        import skimage.data
    except ImportError:
        log.warning("scikit-image is not installed: the page has no example photos")
        return []
    paths = []
    for name, (loader, _licence) in EXAMPLES.items():
        path = folder / name
        if not path.is_file():
            try:
                folder.mkdir(parents=True, exist_ok=True)
                pixels = getattr(skimage.data, loader)()
                partial = path.with_suffix(".part")
                Image.fromarray(pixels).convert("RGB").save(partial, format="JPEG", quality=90)
                partial.replace(path)  # atomic: two pages starting at once never see half a file
            except (OSError, ValueError) as exc:
                log.warning("cannot write example photo %s: %s", path, exc)
                continue
        paths.append(path)
    return paths
