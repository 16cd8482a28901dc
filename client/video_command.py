"""`python -m client segment-video IN --out OUT`: a segmented copy of a video, frame for frame."""

from __future__ import annotations

import argparse
import contextlib
import signal
import sys
from pathlib import Path
from types import FrameType

import numpy as np
from tqdm import tqdm

from client.frames import DEFAULT_WINDOW, FrameResult
from client.sync import SegmentClient
from client.video import VideoWriter, probe


def add_parser(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> argparse.ArgumentParser:
    video = commands.add_parser(
        "segment-video",
        help="segment every frame of a video; writes a video of the same size, frame count and rate",
        description=(
            "Writes OUT with the class colours laid over each frame (--overlay, the default) or the colour "
            "mask alone (--mask). Ctrl-C stops early and keeps what was written as a playable, shorter video."
        ),
    )
    video.add_argument("video", type=Path, metavar="IN", help="a video file FFmpeg can read (mp4, mkv, webm, avi...)")
    video.add_argument("--out", type=Path, required=True, help="output video; its suffix picks the container")
    look = video.add_mutually_exclusive_group()
    look.add_argument("--overlay", dest="look", action="store_const", const="overlay", help="frame + colours (default)")
    look.add_argument("--mask", dest="look", action="store_const", const="mask", help="the colour mask alone")
    video.set_defaults(look="overlay")
    video.add_argument("--opacity", type=float, default=0.5, help="overlay colour weight, 0-1 (default 0.5)")
    video.add_argument("--max-size", type=int, default=0, help="longest side fed to the model (0: server default)")
    video.add_argument("--model", default="", help="the model to use, by name (default: the server's default)")
    video.add_argument(
        "--every",
        type=int,
        default=1,
        metavar="K",
        help="segment every K-th frame only; the frames between reuse the last segmented frame's mask (default 1)",
    )
    video.add_argument("--masks-dir", type=Path, default=None, help="also write each frame's mask PNG here")
    video.add_argument(
        "--window", type=int, default=DEFAULT_WINDOW, help=f"frames in flight at once (default {DEFAULT_WINDOW})"
    )
    video.add_argument("--target", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    return video


class StopOnInterrupt:
    """The first Ctrl-C asks the loop to stop after the frame in hand, so the video is closed properly;
    a second one interrupts at once."""

    def __init__(self) -> None:
        self.requested = False
        self._previous: object = None

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.requested = True
        signal.signal(signal.SIGINT, signal.default_int_handler)

    def __enter__(self) -> StopOnInterrupt:
        self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        signal.signal(signal.SIGINT, self._previous)  # type: ignore[arg-type]


def _picture(item: FrameResult, look: str, opacity: float) -> np.ndarray:
    if item.error is not None:  # keep the frame count: the frame as it was, or black for a mask video
        return item.frame if look == "overlay" else np.zeros_like(item.frame)
    return item.overlay(opacity) if look == "overlay" else item.color_mask


def cmd_segment_video(client: SegmentClient, args: argparse.Namespace) -> int:
    if args.every < 1 or args.window < 1:
        print("error: --every and --window must be at least 1", file=sys.stderr)
        return 2
    if args.out.resolve() == args.video.resolve():
        print("error: --out must not be the input video", file=sys.stderr)
        return 2
    info = probe(args.video)  # NotAVideoError: one line from main()
    if args.masks_dir is not None:
        args.masks_dir.mkdir(parents=True, exist_ok=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    failed: list[str] = []
    frames = client.segment_video(
        args.video, max_size=args.max_size, model=args.model, every=args.every, window=args.window
    )
    progress = tqdm(total=info.frames, unit="frame", file=sys.stderr, dynamic_ncols=True)
    with (
        StopOnInterrupt() as interrupt,
        VideoWriter(args.out, info.width, info.height, info.rate) as writer,
        contextlib.closing(frames),
        progress,
    ):
        for item in frames:
            writer.write(_picture(item, args.look, args.opacity))
            if item.error is not None:
                failed.append(f"frame {item.index}: {item.error}")
            elif args.masks_dir is not None:
                (args.masks_dir / f"{item.index:06d}.png").write_bytes(item.result.mask_png)
            progress.update(1)
            if interrupt.requested:
                break
    done = f"{writer.frames} frames, {info.width}x{info.height} at {float(info.rate):.3g} fps -> {args.out}"
    if interrupt.requested:
        print(f"interrupted: wrote {done}", file=sys.stderr)
        return 130
    for line in failed[:5]:
        print(f"error: {line}", file=sys.stderr)
    if failed:
        print(f"error: {len(failed)} of {writer.frames} frames failed (written unsegmented)", file=sys.stderr)
        return 1
    print(f"wrote {done}")
    return 0
