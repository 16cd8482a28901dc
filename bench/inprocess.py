"""The in-process limit: the server's own decode, model and postprocess calls, without gRPC or the batcher.

`python -m bench.inprocess --images DIR --batch-sizes 1,2,4,8 [--runtime NAME] [--precision P] [--model-alone]`
prints one JSON object per batch size (and, with --model-alone, one more per batch size timing the runtime's
predict alone on the same images decoded beforehand). Images are taken round-robin from the same set the
load generator sends; each batch is decoded, run through the model and postprocessed in a plain loop.
Other settings (model, threads, channels_last...) come from the same SEGSERVE_* environment the server
reads; the runtime is built by the server's own factory, so it is exactly what a server with those settings would run.
"""

from __future__ import annotations

import argparse
import io
import json
import statistics
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
from PIL import Image

from bench.loadgen import load_images
from bench.thread_account import process_cpu_s
from server.core.imaging import Limits, decode_image, fit_within, to_rgb
from server.core.mask_png import mask_png_and_shares
from server.core.postprocess import VOC_PALETTE
from server.runtimes.base import Runtime
from server.runtimes.factory import create_runtime
from server.settings import Settings


def _one_batch(runtime: Runtime, settings: Settings, batch: list[bytes], limits: Limits) -> None:
    decoded = [decode_image(data, settings.max_size, limits) for data in batch]
    labels = runtime.predict([np.asarray(d.model_input, dtype=np.uint8) for d in decoded])
    for label_map, image in zip(labels, decoded, strict=True):
        mask_png_and_shares(label_map, image.original_size, VOC_PALETTE, runtime.facts.labels)


def measure(
    runtime: Runtime,
    settings: Settings,
    images: list[tuple[str, bytes]],
    batch_size: int,
    windows: int,
    window_s: float,
    *,
    model_alone: bool = False,
) -> dict[str, Any]:
    """Images/s over `windows` windows of batches taken round-robin. `model_alone`: the runtime's predict
    alone, on the images decoded and resized beforehand: the ceiling the served path is judged against
    (what a server would reach if everything around the model were free)."""
    limits = Limits(settings.max_image_bytes, settings.max_image_pixels)
    step: Callable[[list[int]], object]
    instances = settings.model_instances if model_alone else 1
    per_step = batch_size * instances
    if model_alone:
        inputs = [np.asarray(decode_image(d, settings.max_size, limits).model_input, np.uint8) for _, d in images]
        if instances > 1:
            # As many batches at once as the server would run (SEGSERVE_MODEL_INSTANCES), each of batch_size.
            pool = ThreadPoolExecutor(instances)

            def side_by_side(chosen: list[int]) -> object:
                return list(
                    pool.map(lambda k: runtime.predict([inputs[j] for j in chosen[k::instances]]), range(instances))
                )

            step = side_by_side
        else:
            step = lambda chosen: runtime.predict([inputs[j] for j in chosen])  # noqa: E731
    else:
        step = lambda chosen: _one_batch(runtime, settings, [images[j][1] for j in chosen], limits)  # noqa: E731
    i = 0
    per_window: list[float] = []
    latencies: dict[str, list[float]] = {}
    step([0] * per_step)  # first call per batch shape is slow
    cpu_before, images_done = process_cpu_s(), 0
    for _ in range(windows):
        done, started = 0, time.monotonic()
        while time.monotonic() - started < window_s:
            chosen = [(i + k) % len(images) for k in range(per_step)]
            i += per_step
            t0 = time.monotonic()
            step(chosen)
            if batch_size == 1 and not model_alone:
                latencies.setdefault(images[chosen[0]][0], []).append(time.monotonic() - t0)
            done += per_step
        per_window.append(done / (time.monotonic() - started))
        images_done += done
    by_kind = {kind: {"count": len(v), "p50_ms": float(np.median(v) * 1000)} for kind, v in sorted(latencies.items())}
    return {
        "batch_size": batch_size,
        "throughput": statistics.median(per_window),
        "throughput_windows": per_window,
        "by_kind": by_kind,
        # Every thread of this process: the model's, and for the full path decoding's and encoding's too.
        "core_ms_per_image": (process_cpu_s() - cpu_before) * 1000 / max(1, images_done),
    }


STAGES = ("decode", "resize", "model input array", "mask PNG and class shares")
"""The work around the model a Segment call asks of the decode/encode workers, in the order it happens."""


def _thread_ms(fn: Callable[[], object], repeats: int) -> float:
    """Median CPU of this thread over `repeats` calls: what the stage costs whatever else the machine runs."""
    spent = []
    for _ in range(repeats):
        started = time.thread_time()
        fn()
        spent.append(time.thread_time() - started)
    return statistics.median(spent) * 1000


def _decoder_output(data: bytes, max_side: int) -> Image.Image:
    """The image as decode_image hands it to the resize (draft scale, no orientation to undo in the bench's
    images), to time the resize apart from the decode. decode_image's own steps, not a call to it: the debugger
    tests set their breakpoint on its statements, so they stay where they are."""
    image = Image.open(io.BytesIO(data))
    target = fit_within(image.size, max_side)
    if image.format == "JPEG" and target != image.size:
        image.draft("RGB", target)
    image.load()
    return to_rgb(image)


def _one_image_stage_costs(
    runtime: Runtime, settings: Settings, limits: Limits, data: bytes, repeats: int
) -> dict[str, float]:
    decoded = decode_image(data, settings.max_size, limits)
    model_input = decoded.model_input
    (label_map,) = runtime.predict([np.asarray(model_input, dtype=np.uint8)])
    unresized = _decoder_output(data, settings.max_size)
    resize_ms = (
        _thread_ms(lambda: unresized.resize(model_input.size, Image.Resampling.BILINEAR), repeats)
        if unresized.size != model_input.size
        else 0.0
    )
    decode_and_resize_ms = _thread_ms(lambda: decode_image(data, settings.max_size, limits), repeats)
    return {
        "decode": max(0.0, decode_and_resize_ms - resize_ms),
        "resize": resize_ms,
        "model input array": _thread_ms(lambda: np.asarray(model_input, dtype=np.uint8), repeats),
        "mask PNG and class shares": _thread_ms(
            lambda: mask_png_and_shares(label_map, decoded.original_size, VOC_PALETTE, runtime.facts.labels), repeats
        ),
    }


def stage_costs(runtime: Runtime, settings: Settings, images: list[tuple[str, bytes]], repeats: int) -> dict[str, Any]:
    """The work around the model per stage, one image at a time on one thread, in core-ms: by image kind
    (median over the images of that kind) and averaged over the set (the mix loadgen sends, per image). The
    mask is the runtime's own answer for the image, so the PNG costs what it costs when served."""
    limits = Limits(settings.max_image_bytes, settings.max_image_pixels)
    per_image = [(kind, _one_image_stage_costs(runtime, settings, limits, data, repeats)) for kind, data in images]
    by_kind = {
        kind: {stage: statistics.median(c[stage] for k, c in per_image if k == kind) for stage in STAGES}
        for kind in sorted({k for k, _ in per_image})
    }
    mix = {stage: statistics.mean(c[stage] for _, c in per_image) for stage in STAGES}
    return {"stages": {"by_kind": by_kind, "mix": mix, "mix_total": sum(mix.values()), "images": len(per_image)}}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.inprocess", description=__doc__.splitlines()[0])
    parser.add_argument("--images", required=True)
    parser.add_argument("--batch-sizes", default="1,2,4,8")
    parser.add_argument("--duration", type=float, default=8.0, help="seconds per measured window")
    parser.add_argument("--repeats", type=int, default=3, help="measured windows per batch size")
    parser.add_argument("--runtime", help="SEGSERVE_RUNTIME for this run (default: the environment's, or auto)")
    parser.add_argument("--precision", help="SEGSERVE_PRECISION for this run")
    parser.add_argument(
        "--model-alone",
        action="store_true",
        help="also time the runtime's predict alone (rows with model_alone), and the work around it per stage",
    )
    parser.add_argument("--stage-repeats", type=int, default=15, help="calls per image and stage (median quoted)")
    args = parser.parse_args(argv)
    from pathlib import Path

    images = load_images(Path(args.images))
    overrides: dict[str, Any] = {"weights": "random"}
    overrides |= {k: v for k, v in (("runtime", args.runtime), ("precision", args.precision)) if v}
    settings = Settings(**overrides)
    runtime = create_runtime(settings.model_settings())
    # What ran, in the same words whether it was named or chosen by auto.
    labels = {
        "runtime": runtime.description,
        "runtime_name": runtime.description.split()[0],
        "precision": runtime.precision,
    }
    for batch_size in (int(b) for b in args.batch_sizes.split(",")):
        result = measure(runtime, settings, images, batch_size, args.repeats, args.duration)
        sys.stdout.write(json.dumps(result | labels) + "\n")
        if args.model_alone:
            alone = measure(runtime, settings, images, batch_size, args.repeats, args.duration, model_alone=True)
            sys.stdout.write(json.dumps(alone | labels | {"model_alone": True}) + "\n")
        sys.stdout.flush()
    if args.model_alone:
        sys.stdout.write(json.dumps(stage_costs(runtime, settings, images, repeats=args.stage_repeats) | labels) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
