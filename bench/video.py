"""`python -m bench.video`: how fast video goes through segserve, and the Live tab's latency.

1. A 640x480, 30 fps clip (generated: a photo with a disc moving across) through
   `SegmentClient.segment_video` at max sizes 512 and 256: frames/s of the library alone, and of the
   whole CLI path (segment, overlay, encode the output video); the mean batch size the server ran.
2. The Live tab's handler (gradio_ui.video.VideoActions.segment_live, without the browser) fed by a
   simulated 30 fps camera; as on the page, the newest frame is taken whenever the previous answer is
   back. Per-frame latency (handler round trip, and the frame's age when its overlay is ready), the rate
   it keeps up, the share of camera frames skipped.

Against a server started here (`python -m server`, random weights: the same compute as trained ones,
max size 512), or `--target` for one already running. Prints JSON lines, writes
bench/results/video-<date>-<device>.json, and with --doc updates the video section of docs/performance.md.
"""

from __future__ import annotations

import argparse
import datetime as dt
import itertools
import json
import logging
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from bench.run import device_slug, free_port, machine_info, stop_server
from client import SegmentClient
from client.video import VideoWriter, probe, read_frames
from gradio_ui.video import VideoActions

log = logging.getLogger("bench.video")

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
DOC = ROOT / "docs" / "performance.md"
BEGIN, END = "<!-- BEGIN bench.video", "<!-- END bench.video -->"
WIDTH, HEIGHT, RATE = 640, 480, 30


def make_clip(path: Path, frames: int) -> None:
    """A scikit-image photo, 640x480, with a bright disc crossing it: encoded like any camera clip."""
    import skimage.data

    photo = np.asarray(
        Image.fromarray(skimage.data.astronaut()).resize((WIDTH, HEIGHT))  # type: ignore[no-untyped-call]
    )
    ys, xs = np.mgrid[0:HEIGHT, 0:WIDTH]
    with VideoWriter(path, WIDTH, HEIGHT, Fraction(RATE)) as writer:
        for index in range(frames):
            frame = photo.copy()
            cx = 80 + (WIDTH - 160) * index / max(frames - 1, 1)
            frame[(xs - cx) ** 2 + (ys - HEIGHT / 2) ** 2 < 60**2] = (230, 40, 40)
            writer.write(frame)


@contextmanager
def served(target: str | None, workdir: Path) -> Iterator[str]:
    """The target to measure: the one given, or a `python -m server` started and stopped here."""
    if target:
        yield target
        return
    port = free_port()
    env = {
        **os.environ,
        "SEGSERVE_WEIGHTS": "random",
        "SEGSERVE_HOST": "127.0.0.1",
        "SEGSERVE_PORT": str(port),
        "SEGSERVE_MAX_SIZE": "512",
        "SEGSERVE_METRICS_PORT": "0",
    }
    server_log = (workdir / "server.log").open("wb")
    server = subprocess.Popen([sys.executable, "-m", "server", "--log-level", "WARNING"], env=env, stderr=server_log)
    try:
        with SegmentClient(f"127.0.0.1:{port}") as client:
            client.wait_until_serving(timeout=300)
        yield f"127.0.0.1:{port}"
    finally:
        stop_server(server)
        server_log.close()


def _images_and_batches(client: SegmentClient) -> tuple[int, int]:
    sizes = client.model_info().batch_sizes
    return sum((i + 1) * n for i, n in enumerate(sizes)), sum(sizes)


def clip_throughput(client: SegmentClient, clip: Path, out: Path, max_size: int, warmup: int) -> dict[str, Any]:
    """frames/s of segment_video alone, then of segment + overlay + encode (what the CLI does)."""
    list(client.segment_frames(itertools.islice(read_frames(clip), warmup), max_size=max_size))  # warm-up
    images_before, batches_before = _images_and_batches(client)
    started = time.perf_counter()
    timings = [item.result.timing for item in client.segment_video(clip, max_size=max_size)]
    library_s = time.perf_counter() - started
    frames = len(timings)
    images_after, batches_after = _images_and_batches(client)
    info = probe(clip)
    started = time.perf_counter()
    with VideoWriter(out, info.width, info.height, info.rate) as writer:
        for item in client.segment_video(clip, max_size=max_size):
            writer.write(item.overlay())
    cli_s = time.perf_counter() - started
    batches = batches_after - batches_before
    return {
        "max_size": max_size,
        "frames": frames,
        "library_fps": frames / library_s,
        "cli_fps": writer.frames / cli_s,
        "mean_batch_size": (images_after - images_before) / batches if batches else 0.0,
        # Where a frame's time went on the server (ms, mean): is any per-frame cost worth cutting?
        "server_ms": {
            part: statistics.fmean(getattr(t, f"{part}_ms") for t in timings)
            for part in ("preprocess", "queue", "inference", "postprocess", "total")
        },
    }


def live_latency(client: SegmentClient, clip: Path, max_size: int, seconds: float) -> dict[str, Any]:
    """The Live tab's handler behind a simulated 30 fps camera, newest frame first."""
    frames = list(read_frames(clip))
    newest: list[tuple[int, float, np.ndarray]] = []  # one slot: (number, capture time, frame)
    stop = threading.Event()
    lock = threading.Condition()

    def camera() -> None:
        number = 0
        start = time.perf_counter()
        while not stop.is_set():
            with lock:
                newest[:] = [(number, time.perf_counter(), frames[number % len(frames)])]
                lock.notify_all()
            number += 1
            time.sleep(max(0.0, start + number / RATE - time.perf_counter()))

    actions = VideoActions(client, str)
    thread = threading.Thread(target=camera, daemon=True)
    thread.start()
    latencies, ages, handled, last = [], [], 0, -1
    deadline = time.perf_counter() + seconds
    try:
        while time.perf_counter() < deadline:
            with lock:
                lock.wait_for(lambda seen=last: bool(newest) and newest[0][0] != seen)  # type: ignore[misc]
                last, captured, frame = newest[0]
            started = time.perf_counter()
            overlay, status, _ = actions.segment_live(frame, max_size, 0.5, None)
            done = time.perf_counter()
            if overlay is None:
                raise RuntimeError(f"a live frame failed: {status}")
            handled += 1
            latencies.append((done - started) * 1000)
            ages.append((done - captured) * 1000)
    finally:
        stop.set()
        thread.join()
    shown = sorted(latencies)
    return {
        "max_size": max_size,
        "camera_fps": RATE,
        "seconds": seconds,
        "frames_shown": handled,
        "shown_fps": handled / seconds,
        "skipped_share": 1 - handled / max(last + 1, 1),
        "latency_ms_mean": statistics.fmean(latencies),
        "latency_ms_p50": shown[len(shown) // 2],
        "latency_ms_p95": shown[min(len(shown) - 1, int(len(shown) * 0.95))],
        "frame_age_ms_mean": statistics.fmean(ages),
    }


def render(result: dict[str, Any], json_path: Path) -> str:
    machine = result["machine"]
    lines = [
        f"{BEGIN}: generated by `python -m bench.video --doc`, do not edit by hand -->",
        "",
        f"Run of {result['date']} ({json_path.name}): **{machine['device']}**, {machine['cpu']}, "
        f"{machine['cores']} cores; load average at start {', '.join(f'{v:.2f}' for v in machine['load'])}. "
        f"Clip: {result['clip']}.",
        "",
        "| Max size | segment_video frames/s | CLI frames/s (segment + overlay + encode) | mean batch size "
        "| server ms per frame: decode / queue / model / postprocess |",
        "| --- | --- | --- | --- | --- |",
    ]
    for row in result["clips"]:
        ms = row["server_ms"]
        lines.append(
            f"| {row['max_size']} | {row['library_fps']:.1f} | {row['cli_fps']:.1f} | {row['mean_batch_size']:.2f} "
            f"| {ms['preprocess']:.1f} / {ms['queue']:.1f} / {ms['inference']:.0f} / {ms['postprocess']:.1f} |"
        )
    lines += [
        "",
        "| Live tab, 30 fps camera, max size | frames shown/s | skipped | latency mean / p50 / p95 | frame age |",
        "| --- | --- | --- | --- | --- |",
    ]
    for row in result["live"]:
        lines.append(
            f"| {row['max_size']} | {row['shown_fps']:.1f} | {row['skipped_share'] * 100:.0f}% | "
            f"{row['latency_ms_mean']:.0f} / {row['latency_ms_p50']:.0f} / {row['latency_ms_p95']:.0f} ms | "
            f"{row['frame_age_ms_mean']:.0f} ms |"
        )
    if result.get("note"):
        lines += ["", result["note"]]
    lines += ["", END]
    return "\n".join(lines)


def update_doc(text: str, doc: Path = DOC) -> None:
    content = doc.read_text()
    if BEGIN in content:
        head, rest = content.split(BEGIN, 1)
        content = head + text + rest.split(END, 1)[1]
    else:
        content = content.rstrip("\n") + "\n\n## Video\n\n" + text + "\n"
    doc.write_text(content)


def run(args: argparse.Namespace) -> dict[str, Any]:
    machine = machine_info()
    result: dict[str, Any] = {
        "date": dt.date.today().isoformat(),
        "machine": {
            "device": machine["device"],
            "cpu": machine["cpu"],
            "cores": os.cpu_count(),
            "load": os.getloadavg(),
        },
        "clip": f"{WIDTH}x{HEIGHT}, {RATE} fps, {args.frames} frames",
        "note": args.note,
        "clips": [],
        "live": [],
    }
    with tempfile.TemporaryDirectory(prefix="bench-video-") as tmp:
        work = Path(tmp)
        clip = work / "clip.mp4"
        make_clip(clip, args.frames)
        with served(args.target, work) as target, SegmentClient(target, timeout=600) as client:
            for max_size in args.max_sizes:
                row = clip_throughput(client, clip, work / "out.mp4", max_size, args.warmup)
                print(json.dumps({"clip": row}), flush=True)
                result["clips"].append(row)
            for max_size in args.max_sizes:
                row = live_latency(client, clip, max_size, args.live_seconds)
                print(json.dumps({"live": row}), flush=True)
                result["live"].append(row)
    RESULTS.mkdir(parents=True, exist_ok=True)
    json_path = RESULTS / f"video-{result['date']}-{device_slug(machine)}.json"
    json_path.write_text(json.dumps(result, indent=2) + "\n")
    print(render(result, json_path))
    if args.doc:
        update_doc(render(result, json_path))
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.video", description=__doc__.split("\n\n")[0])
    parser.add_argument("--target", default=None, help="measure this server instead of starting one")
    parser.add_argument("--frames", type=int, default=150, help="clip length (default 150: 5 s at 30 fps)")
    parser.add_argument("--max-sizes", type=lambda s: [int(v) for v in s.split(",")], default=[512, 256])
    parser.add_argument("--warmup", type=int, default=16, help="frames sent before measuring (default 16)")
    parser.add_argument("--live-seconds", type=float, default=15.0, help="seconds of simulated camera per size")
    parser.add_argument("--doc", action="store_true", help="write the numbers into docs/performance.md")
    parser.add_argument("--note", default="", help="a line printed under the tables (e.g. 'busy machine')")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    run(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
