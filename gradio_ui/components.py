"""Unreadable uploads reach the handler as a sentence, not as an "Error" badge on every output.

Gradio opens every gr.Image upload with Pillow before the handler runs; a file that is not an image
would fail there, and the page would show a bare "Error". (Wrapped per instance rather than by a
subclass: Gradio writes a .pyi file next to the module of every component subclass.)
"""

from __future__ import annotations

from typing import Any

import gradio as gr
from PIL import Image, UnidentifiedImageError


class UnreadableUpload(str):
    """Stands in for the file path when Pillow cannot open an upload; the string is the sentence to show."""


def readable_uploads(image: gr.Image) -> gr.Image:
    original = image.preprocess

    def preprocess(payload: Any) -> Any:
        name = getattr(payload, "orig_name", None) or "That file"
        try:
            return original(payload)
        except UnidentifiedImageError:
            return UnreadableUpload(f"“{name}” is not an image we can read: send a JPEG, PNG, WebP, GIF, BMP or TIFF.")
        except Image.DecompressionBombError as exc:
            return UnreadableUpload(f"Image too large: {exc}")
        except (OSError, ValueError, SyntaxError) as exc:  # Pillow's errors for files that are not images
            return UnreadableUpload(f"“{name}” is not an image we can read: {exc}")

    image.preprocess = preprocess  # type: ignore[method-assign]
    return image
