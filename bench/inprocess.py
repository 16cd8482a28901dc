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
import json
import statistics
import sys
import time
from typing import Any

import numpy as np

from bench.loadgen import load_images
from server.imaging import Limits, decode_image
from server.postprocess import class_shares_of_upsampled, encode_mask_png, upsample_labels
from server.runtimes import Runtime
from server.runtimes.factory import create_runtime
from server.settings import Settings


def _one_batch(runtime: Runtime, settings: Settings, batch: list[bytes], limits: Limits) -> None:
    decoded = [decode_image(data, settings.max_size, limits) for data in batch]
    labels = runtime.predict([np.asarray(d.model_input, dtype=np.uint8) for d in decoded])
    for label_map, image in zip(labels, decoded, strict=True):
        mask = upsample_labels(label_map, image.original_size)
        encode_mask_png(mask)
        class_shares_of_upsampled(label_map, image.original_size, runtime.facts.labels)


def measure(
    runtime: Runtime,
    settings: Settings,
    images: list[tuple[str, bytes]],
    batch_size: int,
    windows: int,
    window_s: float,
) -> dict[str, Any]:
    limits = Limits(settings.max_image_bytes, settings.max_image_pixels)
    i = 0
    per_window: list[float] = []
    latencies: dict[str, list[float]] = {}
    _one_batch(runtime, settings, [images[0][1]] * batch_size, limits)  # first call per batch shape is slow
    for _ in range(windows):
        done, started = 0, time.monotonic()
        while time.monotonic() - started < window_s:
            chosen = [images[(i + k) % len(images)] for k in range(batch_size)]
            i += batch_size
            t0 = time.monotonic()
            _one_batch(runtime, settings, [data for _, data in chosen], limits)
            if batch_size == 1:
                latencies.setdefault(chosen[0][0], []).append(time.monotonic() - t0)
            done += batch_size
        per_window.append(done / (time.monotonic() - started))
    by_kind = {kind: {"count": len(v), "p50_ms": float(np.median(v) * 1000)} for kind, v in sorted(latencies.items())}
    return {
        "batch_size": batch_size,
        "throughput": statistics.median(per_window),
        "throughput_windows": per_window,
        "by_kind": by_kind,
    }


def measure_model_alone(
    runtime: Runtime,
    settings: Settings,
    images: list[tuple[str, bytes]],
    batch_size: int,
    windows: int,
    window_s: float,
) -> dict[str, Any]:
    """The runtime's predict alone, on the same images decoded and resized beforehand: the ceiling the served
    path is judged against (what a server could reach if everything around the model were free)."""
    limits = Limits(settings.max_image_bytes, settings.max_image_pixels)
    inputs = [
        np.asarray(decode_image(data, settings.max_size, limits).model_input, dtype=np.uint8) for _, data in images
    ]
    runtime.predict(inputs[:1] * batch_size)
    i = 0
    per_window: list[float] = []
    for _ in range(windows):
        done, started = 0, time.monotonic()
        while time.monotonic() - started < window_s:
            runtime.predict([inputs[(i + k) % len(inputs)] for k in range(batch_size)])
            i += batch_size
            done += batch_size
        per_window.append(done / (time.monotonic() - started))
    return {"batch_size": batch_size, "throughput": statistics.median(per_window), "throughput_windows": per_window}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.inprocess", description=__doc__.splitlines()[0])
    parser.add_argument("--images", required=True)
    parser.add_argument("--batch-sizes", default="1,2,4,8")
    parser.add_argument("--duration", type=float, default=8.0, help="seconds per measured window")
    parser.add_argument("--repeats", type=int, default=3, help="measured windows per batch size")
    parser.add_argument("--runtime", help="SEGSERVE_RUNTIME for this run (default: the environment's, or auto)")
    parser.add_argument("--precision", help="SEGSERVE_PRECISION for this run")
    parser.add_argument(
        "--model-alone", action="store_true", help="also time the runtime's predict alone (rows with model_alone)"
    )
    args = parser.parse_args(argv)
    from pathlib import Path

    images = load_images(Path(args.images))
    overrides: dict[str, Any] = {"weights": "random"}
    overrides |= {k: v for k, v in (("runtime", args.runtime), ("precision", args.precision)) if v}
    settings = Settings(**overrides)
    runtime = create_runtime(settings)
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
            alone = measure_model_alone(runtime, settings, images, batch_size, args.repeats, args.duration)
            sys.stdout.write(json.dumps(alone | labels | {"model_alone": True}) + "\n")
        sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
