"""The page's layout and wiring: `build_app(settings)` returns the Gradio Blocks, `launch()` serves it."""

from __future__ import annotations

import logging
from typing import Any

import gradio as gr

from gradio_ui import render
from gradio_ui.actions import PageActions
from gradio_ui.components import readable_uploads
from gradio_ui.examples import EXAMPLES, example_photos
from gradio_ui.settings import UISettings
from gradio_ui.video import VideoActions

log = logging.getLogger(__name__)

TITLE = "segserve — image segmentation"
INTRO = (
    "Segment a photo into classes with DeepLabV3: the 21 PASCAL VOC classes (person, cat, car, …), or the "
    "classes of the model you pick. "
    "The page sends your photo to the segserve gRPC server at **{target}** and shows what it found."
)
# System fonts only: the page must look right on machines without internet access.
THEME = gr.themes.Soft(
    primary_hue="indigo",
    font=["ui-sans-serif", "system-ui", "Segoe UI", "Roboto", "Helvetica", "Arial", "sans-serif"],
    font_mono=["ui-monospace", "SFMono-Regular", "Menlo", "Consolas", "monospace"],
)
# Segmentation calls mostly wait on the server, which batches concurrent requests.
CONCURRENCY = 8
# How often the browser posts a camera frame. The page segments the newest one whenever the previous
# answer is back, so this caps the live rate rather than setting it.
LIVE_FRAME_EVERY_S = 0.05


def build_app(settings: UISettings, actions: PageActions | None = None) -> gr.Blocks:
    actions = actions or PageActions(settings.target, settings.timeout_s)
    video_actions = VideoActions(actions.client, actions._describe)
    examples = example_photos()
    demo = gr.Blocks(title=TITLE, analytics_enabled=False)
    with demo:
        gr.Markdown(f"# {TITLE}\n{INTRO.format(target=settings.target)}")
        with gr.Accordion("Server", open=True):
            model_panel = gr.HTML(render.status("Asking the server about its model…"), elem_id="segserve-panel")
            refresh = gr.Button("Refresh", size="sm", variant="secondary", elem_id="segserve-refresh")
        with gr.Row():
            model_choice = gr.Dropdown(
                choices=[], value=None, label="Model",
                info="Which of the server's models segments (every tab uses it).",
                elem_id="segserve-model-choice",
            )  # fmt: skip
            max_size = gr.Slider(
                16, 2048, value=512, step=16, label="Max size",
                info="Longest side fed to the model, in pixels (capped at the server's maximum).",
                elem_id="segserve-max-size",
            )  # fmt: skip
            opacity = gr.Slider(
                0.0, 1.0, value=0.5, step=0.05, label="Overlay opacity",
                info="How strongly the class colours cover the photo.", elem_id="segserve-opacity",
            )  # fmt: skip

        with gr.Tabs():
            with gr.Tab("One photo", id="one"), gr.Row(equal_height=False):
                with gr.Column(scale=1):
                    image = gr.Image(
                        type="filepath",
                        sources=["upload", "clipboard", "webcam"],
                        label="Photo",
                        height=380,
                        elem_id="segserve-input",
                    )
                    readable_uploads(image)
                    segment = gr.Button("Segment", variant="primary", elem_id="segserve-segment")
                    if examples:
                        gr.Examples(
                            examples=[str(p) for p in examples],
                            inputs=image,
                            label="Example photos",
                        )
                        gr.Markdown(
                            "Scikit-image sample photos: "
                            + "; ".join(f"{name} ({lic})" for name, (_, lic) in EXAMPLES.items()),
                            elem_classes=["segserve-credits"],
                        )
                with gr.Column(scale=1):
                    single_status = gr.HTML(
                        render.status("Drop a photo, paste one or pick an example."), elem_id="segserve-status"
                    )
                    with gr.Tabs():
                        with gr.Tab("Overlay"):
                            overlay = gr.Image(
                                label="Overlay", format="jpeg", interactive=False, height=380,
                                buttons=["download", "fullscreen"], elem_id="segserve-overlay",
                            )  # fmt: skip
                        with gr.Tab("Colour mask"):
                            mask = gr.Image(
                                label="Colour mask (palette PNG, the model's class colours)", format="png",
                                interactive=False,
                                height=380, buttons=["download", "fullscreen"], elem_id="segserve-mask",
                            )  # fmt: skip
                    gr.Markdown("### Classes found")
                    legend = gr.HTML("", elem_id="segserve-legend")
                    gr.Markdown("### Timing")
                    timing = gr.HTML("", elem_id="segserve-timing")

            with gr.Tab("Many photos", id="many"):
                gr.Markdown(
                    "Send several photos over one `SegmentStream`: the server batches them, "
                    "and each result appears here as soon as it is ready."
                )
                files = gr.File(
                    file_count="multiple", file_types=["image"], label="Photos", elem_id="segserve-files"
                )  # fmt: skip
                segment_all = gr.Button("Segment all", variant="primary", elem_id="segserve-segment-all")
                gallery = gr.Gallery(
                    label="Overlays", columns=4, height="auto", format="jpeg", object_fit="contain",
                    elem_id="segserve-gallery",
                )  # fmt: skip
                many_status = gr.HTML("", elem_id="segserve-many-status")

            with gr.Tab("Live", id="live"):
                gr.Markdown(
                    "Segment your camera live: press record under the camera. Frames go to the server one at a "
                    "time; when it falls behind, older frames are skipped so the overlay stays current."
                )
                with gr.Row(equal_height=False):
                    camera = gr.Image(
                        sources=["webcam"], streaming=True, type="numpy", label="Camera", height=380,
                        elem_id="segserve-camera",
                    )  # fmt: skip
                    live_overlay = gr.Image(
                        label="Live overlay", format="jpeg", interactive=False, height=380,
                        elem_id="segserve-live-overlay",
                    )  # fmt: skip
                live_stats = gr.HTML(
                    render.status("Allow the camera, then press record to start."), elem_id="segserve-live-stats"
                )
                live_session = gr.State(None)

            with gr.Tab("Video", id="video"):
                gr.Markdown(
                    "Upload a short clip: every frame goes through one `SegmentStream`, and you get back a clip "
                    "of the same size, length and frame rate with the classes coloured in."
                )
                with gr.Row(equal_height=False):
                    with gr.Column(scale=1):
                        clip = gr.Video(sources=["upload"], label="Clip", height=320, elem_id="segserve-clip")
                        every = gr.Slider(
                            1, 10, value=1, step=1, label="Segment every K-th frame",
                            info="The frames in between reuse the last mask: faster, a little less exact.",
                            elem_id="segserve-every",
                        )  # fmt: skip
                        segment_clip = gr.Button("Segment clip", variant="primary", elem_id="segserve-segment-clip")
                    with gr.Column(scale=1):
                        clip_out = gr.Video(
                            label="Segmented clip", interactive=False, height=320, buttons=["download"],
                            elem_id="segserve-clip-out",
                        )  # fmt: skip
                        clip_status = gr.HTML("", elem_id="segserve-clip-status")

        single_outputs: list[Any] = [overlay, mask, legend, timing, single_status, model_panel]
        single_inputs: list[Any] = [image, max_size, opacity, model_choice]
        demo.load(actions.load_page, [model_choice], [model_panel, max_size, model_choice], show_progress="hidden")
        refresh.click(actions.load_page, [model_choice], [model_panel, max_size, model_choice])
        model_choice.input(actions.choose_model, [model_choice], [model_panel, max_size], show_progress="hidden")
        segment.click(actions.segment_one, single_inputs, single_outputs, concurrency_limit=CONCURRENCY)
        # Dropping, pasting or picking an example segments at once; clearing the photo clears the results.
        image.change(actions.segment_one, single_inputs, single_outputs, concurrency_limit=CONCURRENCY)
        segment_all.click(
            actions.segment_many,
            [files, max_size, opacity, model_choice],
            [gallery, many_status],
            concurrency_limit=CONCURRENCY,
        )
        camera.stream(
            video_actions.segment_live,
            [camera, max_size, opacity, live_session, model_choice],
            [live_overlay, live_stats, live_session],
            stream_every=LIVE_FRAME_EVERY_S,
            concurrency_limit=CONCURRENCY,
            show_progress="hidden",
        )
        segment_clip.click(
            video_actions.segment_clip, [clip, max_size, opacity, every, model_choice], [clip_out, clip_status],
            concurrency_limit=CONCURRENCY, show_progress="minimal",
        )  # fmt: skip
    return demo


def launch(settings: UISettings, *, block: bool = True) -> gr.Blocks:
    demo = build_app(settings)
    demo.queue(default_concurrency_limit=CONCURRENCY)
    log.info("page on http://%s:%d (server %s)", settings.host, settings.port, settings.target)
    demo.launch(
        server_name=settings.host,
        server_port=settings.port,
        share=False,
        prevent_thread_lock=not block,
        theme=THEME,
        css=render.CSS,
        quiet=True,
        show_error=False,
    )
    return demo
