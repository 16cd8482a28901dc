"""The in-process limit: the server's own decode, model and postprocess calls, without gRPC or the batcher.

`python -m bench.inprocess --images DIR --batch-sizes 1,2,4,8` prints one JSON object per batch size.
Images are taken round-robin from the same set the load generator sends; each batch is decoded, run
through the model and postprocessed in a plain loop. Settings (model, threads, channels_last...) come
from the same SEGSERVE_* environment the server reads.
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
from server.model import ModelRuntime
from server.postprocess import class_shares_of_upsampled, encode_mask_png, upsample_labels
from server.settings import Settings


def _one_batch(runtime: ModelRuntime, settings: Settings, batch: list[bytes], limits: Limits) -> None:
    decoded = [decode_image(data, settings.max_size, limits) for data in batch]
    labels = runtime.predict([np.asarray(d.model_input, dtype=np.uint8) for d in decoded])
    for label_map, image in zip(labels, decoded, strict=True):
        mask = upsample_labels(label_map, image.original_size)
        encode_mask_png(mask)
        class_shares_of_upsampled(label_map, image.original_size, runtime.labels)


def measure(
    runtime: ModelRuntime,
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.inprocess", description=__doc__.splitlines()[0])
    parser.add_argument("--images", required=True)
    parser.add_argument("--batch-sizes", default="1,2,4,8")
    parser.add_argument("--duration", type=float, default=8.0, help="seconds per measured window")
    parser.add_argument("--repeats", type=int, default=3, help="measured windows per batch size")
    args = parser.parse_args(argv)
    from pathlib import Path

    images = load_images(Path(args.images))
    settings = Settings()
    s = settings
    runtime = ModelRuntime(s.model, "random", s.device, s.channels_last, s.half, s.torch_threads)
    for batch_size in (int(b) for b in args.batch_sizes.split(",")):
        result = measure(runtime, settings, images, batch_size, args.repeats, args.duration)
        sys.stdout.write(json.dumps(result) + "\n")
        sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
