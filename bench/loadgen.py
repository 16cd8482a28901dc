"""A closed-loop load generator in the manner of Triton's perf_analyzer, run in its own process.

`python -m bench.loadgen --target HOST:PORT --images DIR --concurrency 1,2,4 --duration 8 --repeats 3`
prints one JSON object per concurrency step on stdout. Each step keeps `concurrency` requests in flight
(one blocking client call per thread), discards a warm-up window, then counts completions in `repeats`
windows of `duration` seconds: throughput is the median window, latency percentiles cover all of them.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from client import SegmentClient, SegmentError


@dataclass(frozen=True)
class Sample:
    finished: float
    latency_s: float
    kind: str
    error: str | None
    batch_size: int
    parts_ms: tuple[float, float, float, float]
    """preprocess, queue, inference, postprocess as the server reported them."""


def load_images(folder: Path) -> list[tuple[str, bytes]]:
    """(kind, bytes) in file-name order; file names start with their kind ("photo-..." or "large-...")."""
    return [(path.name.split("-", 1)[0], path.read_bytes()) for path in sorted(folder.glob("*.jpg"))]


def _worker(
    client: SegmentClient, images: list[tuple[str, bytes]], offset: int, stop_at: float, out: list[Sample]
) -> None:
    i = offset
    while time.monotonic() < stop_at:
        kind, data = images[i % len(images)]
        i += 1
        started = time.monotonic()
        try:
            result = client.segment(data, image_id=f"{kind}-{i}")
        except SegmentError as exc:
            out.append(Sample(time.monotonic(), time.monotonic() - started, kind, exc.code.name, 0, (0, 0, 0, 0)))
            continue
        t = result.timing
        parts = (t.preprocess_ms, t.queue_ms, t.inference_ms, t.postprocess_ms)
        out.append(Sample(time.monotonic(), time.monotonic() - started, kind, None, t.batch_size, parts))


def _percentiles_ms(latencies: list[float]) -> dict[str, float]:
    if not latencies:
        return {"p50_ms": float("nan"), "p95_ms": float("nan"), "p99_ms": float("nan")}
    p50, p95, p99 = np.percentile(np.asarray(latencies) * 1000, [50, 95, 99])
    return {"p50_ms": float(p50), "p95_ms": float(p95), "p99_ms": float(p99)}


def summarise(samples: list[Sample], start: float, warmup_s: float, duration_s: float, repeats: int) -> dict[str, Any]:
    """Throughput per window (median quoted), latency percentiles, errors and mean batch size."""
    first = start + warmup_s
    windows = [
        sum(
            1
            for s in samples
            if s.error is None and first + k * duration_s <= s.finished < first + (k + 1) * duration_s
        )
        / duration_s
        for k in range(repeats)
    ]
    measured = [s for s in samples if first <= s.finished < first + repeats * duration_s]
    ok = [s for s in measured if s.error is None]
    errors: dict[str, int] = {}
    for s in measured:
        if s.error is not None:
            errors[s.error] = errors.get(s.error, 0) + 1
    # Every image in a batch of n reports n, so images / sum(1/n) is the mean size of the batches they ran in.
    batches = sum(1 / s.batch_size for s in ok if s.batch_size > 0)
    by_kind = {
        kind: {"count": len(group), **_percentiles_ms([s.latency_s for s in group])}
        for kind in sorted({s.kind for s in ok})
        if (group := [s for s in ok if s.kind == kind])
    }
    parts = np.asarray([s.parts_ms for s in ok]) if ok else np.zeros((1, 4))
    return {
        "throughput": statistics.median(windows) if windows else 0.0,
        "throughput_windows": windows,
        **_percentiles_ms([s.latency_s for s in ok]),
        "requests": len(ok),
        "errors": sum(errors.values()),
        "error_codes": errors,
        "mean_batch_size": len(ok) / batches if batches else 0.0,
        "by_kind": by_kind,
        "server_parts_ms": dict(
            zip(("preprocess", "queue", "inference", "postprocess"), map(float, parts.mean(axis=0)), strict=True)
        ),
    }


def run_step(
    target: str, images: list[tuple[str, bytes]], concurrency: int, warmup_s: float, duration_s: float, repeats: int
) -> dict[str, Any]:
    samples: list[Sample] = []
    start = time.monotonic()
    stop_at = start + warmup_s + duration_s * repeats
    with SegmentClient(target, timeout=120) as client:
        # Offsets spread the threads over the image list, so the large photo is not sent by all at once.
        threads = [
            threading.Thread(
                target=_worker, args=(client, images, k * len(images) // concurrency, stop_at, samples), daemon=True
            )
            for k in range(concurrency)
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    return {"concurrency": concurrency, **summarise(samples, start, warmup_s, duration_s, repeats)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.loadgen", description=__doc__.splitlines()[0])
    parser.add_argument("--target", required=True)
    parser.add_argument("--images", type=Path, required=True, help="folder of photo-*.jpg and large-*.jpg")
    parser.add_argument("--concurrency", default="1,2,4,8,16", help="comma-separated steps")
    parser.add_argument("--warmup", type=float, default=2.0, help="seconds discarded at the start of each step")
    parser.add_argument("--duration", type=float, default=8.0, help="seconds per measured window")
    parser.add_argument("--repeats", type=int, default=3, help="measured windows per step")
    args = parser.parse_args(argv)
    images = load_images(args.images)
    if not images:
        parser.error(f"no images in {args.images}")
    for concurrency in (int(c) for c in args.concurrency.split(",")):
        step = run_step(args.target, images, concurrency, args.warmup, args.duration, args.repeats)
        sys.stdout.write(json.dumps(step) + "\n")
        sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
