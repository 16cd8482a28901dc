"""`python -m bench.precisions`: openvino's int8 against its bf16 and fp32, the model alone, in one process.

The served model (random weights, the server's max_size) built at each precision in a fresh graph cache
(so int8's quantization time is measured, as a first start pays it), then each timed on the bench's images
decoded beforehand, batch 1 and 8, in interleaved rounds (a machine whose speed drifts favours no side);
each figure is its best round. Prints one JSON object: images/s per precision and batch, int8's speed over
bf16's (issue 41's target: 1.5x or more on a CPU with AMX int8), its quantization seconds, and what this
CPU has (int8 units or not), so that a run on a CPU without them says whether int8 pays there.
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import tempfile
import time
from typing import Any

import numpy as np

from server.runtimes import cpu_features
from server.runtimes.base import Runtime
from server.runtimes.factory import create_runtime
from server.settings import Settings

PRECISIONS = ("fp32", "bf16", "int8")
BATCH_SIZES = (1, 8)


def model_inputs(max_size: int, count: int) -> list[np.ndarray]:
    """The bench's images at one 4:3 shape, max_size wide: the model alone is timed on one shape (the server's
    own resize keeps each image's aspect ratio)."""
    from PIL import Image

    from bench.images import image_set

    width, height = max_size, max_size * 3 // 4
    out = []
    for image in image_set()[:count]:
        decoded = Image.open(io.BytesIO(image.data)).convert("RGB").resize((width, height), Image.Resampling.BILINEAR)
        out.append(np.asarray(decoded, dtype=np.uint8))
    return out


def timed_rounds(runtimes: dict[str, Runtime], images: list[np.ndarray], batch: int, rounds: int) -> dict[str, float]:
    """Images/s of each runtime's best round; each round runs every runtime once, in turn."""
    batches = [[images[(k + j) % len(images)] for j in range(batch)] for k in range(0, len(images), batch)]
    for runtime in runtimes.values():
        runtime.predict(batches[0])  # a shape's first call pays one-off set-up
    best = dict.fromkeys(runtimes, float("inf"))
    for _ in range(rounds):
        for name, runtime in runtimes.items():
            started = time.perf_counter()
            for chunk in batches:
                runtime.predict(chunk)
            best[name] = min(best[name], time.perf_counter() - started)
    return {name: len(batches) * batch / seconds for name, seconds in best.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.precisions", description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--images", type=int, default=8)
    parser.add_argument("--max-size", type=int, default=Settings().max_size)
    args = parser.parse_args(argv)
    images = model_inputs(args.max_size, args.images)
    runtimes: dict[str, Runtime] = {}
    build_s: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="segserve-precisions-") as cache:
        for precision in PRECISIONS:
            started = time.monotonic()
            settings = Settings(
                runtime="openvino", precision=precision, weights="random", max_size=args.max_size, cache_dir=cache
            )
            runtimes[precision] = create_runtime(settings.model_settings())
            build_s[precision] = time.monotonic() - started
        rows: dict[str, Any] = {}
        for batch in BATCH_SIZES:
            rows[str(batch)] = timed_rounds(runtimes, images, batch, args.rounds)
    int8_over_bf16 = {batch: row["int8"] / row["bf16"] for batch, row in rows.items()}
    result = {
        "max_size": args.max_size,
        "rounds": args.rounds,
        "images_per_s": rows,
        "int8_over_bf16": int8_over_bf16,
        "int8_over_fp32": {batch: row["int8"] / row["fp32"] for batch, row in rows.items()},
        # Seconds to a runtime ready to serve, in this order in one fresh cache: fp32's includes the graph's
        # export, bf16's is compiling alone, int8's is quantizing (NNCF) and compiling.
        "start_s": build_s,
        "descriptions": {p: r.description for p, r in runtimes.items()},
        "native_int8": cpu_features.native_int8(),
        "amx_int8": "amx_int8" in cpu_features.cpu_flags(),
        "int8_pays": min(int8_over_bf16.values()) > 1.0,
    }
    sys.stdout.write(json.dumps(result) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
