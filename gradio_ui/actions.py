"""What the page's buttons do: calls through the client library, answers as images and HTML, never tracebacks."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
from PIL import Image

from client import SegmentationResult, SegmentClient, SegmentError
from client.security import open_channel
from gradio_ui import render
from gradio_ui.components import UnreadableUpload
from gradio_ui.errors import describe_error
from protos.segserve.v1 import segserve_pb2 as pb

log = logging.getLogger(__name__)

# gRPC waits up to two minutes between reconnect attempts by default; a page whose server comes back
# should notice within seconds.
RECONNECT_OPTIONS: list[tuple[str, object]] = [
    ("grpc.initial_reconnect_backoff_ms", 500),
    ("grpc.min_reconnect_backoff_ms", 500),
    ("grpc.max_reconnect_backoff_ms", 2000),
]
INFO_TIMEOUT_S = 5.0

SingleOutputs = tuple[Image.Image | None, Image.Image | None, str, str, str, str]
GalleryItem = tuple[Image.Image, str]


class PageActions:
    """Holds one client (one channel) for the whole page; its methods are the Gradio event handlers."""

    def __init__(self, target: str, timeout_s: float = 60.0) -> None:
        self.target = target
        channel = open_channel(target, extra_options=RECONNECT_OPTIONS)
        self.client = SegmentClient(target, timeout=timeout_s, channel=channel)
        self._info_error: SegmentError | None = None

    def close(self) -> None:
        self.client.close()

    # -- model panel -----------------------------------------------------------------------------

    def model_info(self, model: str | None = "") -> pb.ModelInfo | None:
        """The model the page has chosen (empty: the server's default)."""
        self._info_error = None
        try:
            return self.client.model_info(timeout=INFO_TIMEOUT_S, model=model or "")
        except SegmentError as exc:
            self._info_error = exc
            return None

    def model_names(self) -> tuple[list[str], str]:
        """The models the server serves now, and its default; nothing when it cannot say."""
        try:
            models = self.client.list_models(timeout=INFO_TIMEOUT_S)
        except SegmentError:
            return [], ""
        ready = [m.name for m in models if m.state == "READY"]
        default = next((m.name for m in models if m.is_default and m.state == "READY"), ready[0] if ready else "")
        return ready, default

    def panel(self, info: pb.ModelInfo | None) -> str:
        if info is None:
            if self._info_error is not None and self._info_error.not_serving:
                return render.unreachable_panel(
                    f"The server at {self.target} is up but not serving yet (loading its model, or shutting down); "
                    "reload the page in a few seconds."
                )
            return render.unreachable_panel(f"Cannot reach the segmentation server at {self.target} — is it running?")
        return render.model_panel(info)

    def load_page(self, chosen: str | None = "") -> tuple[str, Any, Any]:
        """On page load (and Refresh): the model choices (keeping the one chosen while it is served), the chosen
        model's panel, and the max-size slider capped at that model's maximum."""
        import gradio as gr

        names, default = self.model_names()
        model = chosen if chosen in names else default
        choice = gr.update(choices=names, value=model or None, interactive=len(names) > 1)
        panel, size = self.choose_model(model)
        return panel, size, choice

    def choose_model(self, model: str | None) -> tuple[str, Any]:
        """A model picked in the dropdown: its panel, and the max-size slider capped at its maximum."""
        import gradio as gr

        info = self.model_info(model)
        if info is None or info.max_size == 0:
            return self.panel(info), gr.update()
        return self.panel(info), gr.update(maximum=info.max_size, value=info.max_size)

    # -- one image -------------------------------------------------------------------------------

    def segment_one(
        self, image_path: str | None, max_size: float, opacity: float, model: str | None = ""
    ) -> SingleOutputs:
        """Overlay, colour mask, legend, timing, status line and model panel for one photo, by the chosen model."""
        model = model or ""
        if not image_path:
            return None, None, "", "", render.status("Drop a photo, paste one or pick an example."), self._panel(model)
        if isinstance(image_path, UnreadableUpload):
            return None, None, "", "", render.status(str(image_path), "error"), self._panel(model)
        name = Path(image_path).name
        try:
            data = Path(image_path).read_bytes()
            result = self.client.segment(
                data, max_size=int(max_size), overlay=True, overlay_opacity=float(opacity), model=model, image_id=name
            )
        except SegmentError as exc:
            log.info("segment %s failed: %s", name, exc)
            return None, None, "", "", render.status(self._describe(exc), "error"), self._panel(model)
        except OSError as exc:
            failed = render.status(f"Cannot read the uploaded file: {exc}", "error")
            return None, None, "", "", failed, self._panel(model)
        except Exception:  # a bug of ours: the log gets the traceback, the page a sentence
            log.exception("segment %s failed", name)
            return None, None, "", "", render.status("Something went wrong in the page; see its log.", "error"), ""
        info = self.model_info(model)
        colors = render.label_colors(info) or palette_colors(result)
        done = f"Segmented {result.width}x{result.height} image: {result.summary(3)}."
        return (
            result.overlay,
            result.mask_image,
            render.legend(result.classes, colors),
            render.timing(result.timing, result.model_size, (result.width, result.height)),
            render.status(done, "ok"),
            self.panel(info),
        )

    # -- many images -----------------------------------------------------------------------------

    def segment_many(
        self, files: list[str] | None, max_size: float, opacity: float, model: str | None = ""
    ) -> Iterator[tuple[list[GalleryItem], str]]:
        """Streams the photos through SegmentStream; the gallery grows as each answer arrives."""
        if not files:
            yield [], render.status("Add some photos first.")
            return
        names = [Path(f).name for f in files]
        gallery: list[GalleryItem] = []
        lines: list[str] = []
        failed = 0
        yield gallery, render.status(f"Segmenting {len(files)} images…")
        try:
            results = self.client.segment_many(
                [Path(f) for f in files],
                max_size=int(max_size),
                overlay=True,
                overlay_opacity=float(opacity),
                model=model or "",
            )
            for done, result in enumerate(results, start=1):
                name = result.id or names[done - 1]
                if result.error is not None:
                    failed += 1
                    lines.append(render.status(describe_error(result.error, self.target, name=name), "error"))
                else:
                    gallery.append((self._overlay_or_mask(result), f"{name}: {result.summary(3)}"))
                    lines.append(render.status(f"{name}: {result.summary(3)} · {result.timing.total_ms:.0f} ms", "ok"))
                yield gallery, self._progress(done, len(files), failed) + "".join(reversed(lines))
        except SegmentError as exc:
            yield gallery, render.status(self._describe(exc), "error") + "".join(reversed(lines))
        except Exception:
            log.exception("segment_many failed")
            yield gallery, render.status("Something went wrong in the page; see its log.", "error")

    # -- helpers ---------------------------------------------------------------------------------

    def _describe(self, exc: SegmentError) -> str:
        reachable = False
        if exc.code == grpc.StatusCode.UNAVAILABLE:
            try:
                self.client.health(timeout=2.0)
                reachable = True
            except SegmentError:
                reachable = False
        return describe_error(exc, self.target, reachable=reachable)

    def _panel(self, model: str = "") -> str:
        return self.panel(self.model_info(model))

    @staticmethod
    def _overlay_or_mask(result: SegmentationResult) -> Image.Image:
        return result.overlay if result.overlay is not None else result.mask_image

    @staticmethod
    def _progress(done: int, total: int, failed: int) -> str:
        text = f"{done} of {total} images done" + (f", {failed} failed" if failed else "") + "."
        return render.status(text, "warning" if failed else ("ok" if done == total else "info"))


def palette_colors(result: SegmentationResult) -> dict[int, str]:
    """Class colours from the mask's own palette, for when GetModelInfo is not answering."""
    palette = result.mask_image.getpalette() or []
    return {
        c.index: "#{:02x}{:02x}{:02x}".format(*palette[c.index * 3 : c.index * 3 + 3])
        for c in result.classes
        if len(palette) >= c.index * 3 + 3
    }
