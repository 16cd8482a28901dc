"""Video over SegmentStream: the library (sync and asyncio) and `python -m client segment-video`.

Masks are judged with the known-answer model: a red disc ("person", class 15) moves across the clip, and
each frame's mask must find it where it was drawn. The library's tests take `connect_client` and run with
each client; test_asyncio_twin also drives AsyncSegmentClient from asyncio itself, with no adapter between.
"""

from __future__ import annotations

import asyncio
import io
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from client import AsyncSegmentClient
from client.frames import FrameResult
from client.video import probe, read_frames
from tests.helpers.known_model import CLASS_OF, SHAPE_FLOOR, iou
from tests.helpers.video_clips import centroid_x, shapes_frames, write_shapes_clip

ROOT = Path(__file__).resolve().parents[2]
RED = CLASS_OF["red"]
FRAMES = 24
# A mask of the wrong frame scores ~0.3 against the frame's disc (it hops ~24 px from frame to frame), and
# lands its centroid 18 px or more off; the known-answer model scores well over SHAPE_FLOOR on any CPU.
MIN_IOU = SHAPE_FLOOR
# VOC palette colour of class 15, "person".
PERSON_RGB = (192, 128, 128)


@pytest.fixture(scope="module")
def clip(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[np.ndarray]]:
    path = tmp_path_factory.mktemp("clip") / "disc.mp4"
    return path, write_shapes_clip(path, FRAMES, rate=Fraction(25))


def run_cli(*args: str, timeout: float = 180) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "client", *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout
    )


def assert_masks_follow_the_disc(masks: list[np.ndarray], truths: list[np.ndarray]) -> None:
    scores = [iou(mask, truth, RED) for mask, truth in zip(masks, truths, strict=True)]
    assert min(scores) >= MIN_IOU, scores
    xs = [centroid_x(mask, RED) for mask in masks]
    drawn = [centroid_x(truth, RED) for truth in truths]
    # Within 5 px of where it was drawn, every frame; the disc hops 18 px or more between frames.
    assert np.abs(np.subtract(xs, drawn)).max() <= 5, np.round(np.subtract(xs, drawn), 1)


def mixed_shapes() -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Landscape and portrait frames in turn: the server batches one shape at a time, so its answers come
    back out of order (0, 1, 3, 5, 7, 2, 6... in a trial run)."""
    landscape, landscape_truths = shapes_frames(16, 160, 120)
    portrait, portrait_truths = shapes_frames(16, 120, 160)
    frames = [landscape[i] if i % 2 == 0 else portrait[i] for i in range(16)]
    return frames, [landscape_truths[i] if i % 2 == 0 else portrait_truths[i] for i in range(16)]


@pytest.mark.slow
def test_segment_video_yields_every_frame_in_order_and_the_masks_follow_the_disc(
    connect_client: Callable[..., Any], known_server, clip
):
    path, truths = clip
    with connect_client(known_server.target) as client:
        results = list(client.segment_video(path, window=4))
    assert [r.index for r in results] == list(range(FRAMES))
    assert all(r.ok and not r.reused for r in results)
    assert {r.mask.shape for r in results} == {(120, 160)}
    assert_masks_follow_the_disc([r.mask for r in results], truths)


@pytest.mark.slow
def test_asyncio_twin_gives_the_same_frames_in_order(known_server, clip):
    path, truths = clip

    mixed, mixed_truths = mixed_shapes()

    async def segment() -> tuple[list[np.ndarray], list[FrameResult]]:
        async with AsyncSegmentClient(known_server.target) as client:
            masks = [r.mask async for r in client.segment_video(path, window=3)]
            return masks, [r async for r in client.segment_frames(mixed, window=8)]

    masks, mixed_results = asyncio.run(segment())
    assert len(masks) == FRAMES
    assert_masks_follow_the_disc(masks, truths)
    assert [r.index for r in mixed_results] == list(range(16))
    assert_masks_follow_the_disc([r.mask for r in mixed_results], mixed_truths)


@pytest.mark.slow
def test_answers_that_arrive_out_of_order_are_handed_back_in_frame_order(
    connect_client: Callable[..., Any], known_server
):
    frames, truths = mixed_shapes()
    with connect_client(known_server.target) as client:
        results = list(client.segment_frames(frames, window=8))
    assert [r.index for r in results] == list(range(16))
    assert [r.mask.shape for r in results] == [t.shape for t in truths]
    assert_masks_follow_the_disc([r.mask for r in results], truths)


@pytest.mark.slow
def test_segment_frames_holds_at_most_a_window_of_frames(connect_client: Callable[..., Any], known_server):
    frames, truths = shapes_frames(40, 160, 120)
    window = 3
    pulled = 0

    def source() -> Iterator[object]:
        nonlocal pulled
        for i, frame in enumerate(frames):
            pulled += 1
            yield Image.fromarray(frame) if i % 2 else frame  # PIL images and arrays alike

    seen = []
    with connect_client(known_server.target) as client:
        for result in client.segment_frames(source(), window=window):
            # Handed back: result.index + 1, plus up to window - 1 popped with it and not yet yielded; then at
            # most `window` held and one taken from the source, waiting for room. Unbounded, it would be 40.
            assert pulled <= result.index + 2 * window + 1, (pulled, result.index)
            seen.append(result.mask)
    assert len(seen) == 40
    assert_masks_follow_the_disc(seen, truths)


@pytest.mark.slow
def test_every_k_sends_one_frame_in_k_and_reuses_its_mask(connect_client: Callable[..., Any], known_server):
    frames, _ = shapes_frames(10, 160, 120)
    with connect_client(known_server.target) as client:
        before = sum((i + 1) * n for i, n in enumerate(client.model_info().batch_sizes))
        results = list(client.segment_frames(frames, every=3))
        after = sum((i + 1) * n for i, n in enumerate(client.model_info().batch_sizes))
    assert after - before == 4  # frames 0, 3, 6 and 9 reached the model
    assert [r.reused for r in results] == [i % 3 != 0 for i in range(10)]
    assert results[4].result is results[3].result and results[3].result is not results[0].result
    assert [r.index for r in results] == list(range(10))
    assert all(np.array_equal(r.frame, frames[r.index]) for r in results)  # each frame is its own


@pytest.mark.slow
def test_cli_writes_a_clip_of_the_same_frames_size_and_rate_with_masks_that_follow(known_server, clip, tmp_path):
    path, truths = clip
    out, masks_dir = tmp_path / "out.mp4", tmp_path / "masks"
    done = run_cli(
        "--target", known_server.target, "segment-video", str(path), "--out", str(out), "--masks-dir", str(masks_dir)
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    source, written = probe(path), probe(out)
    assert (written.width, written.height, written.rate) == (source.width, source.height, source.rate)
    assert len(list(read_frames(out))) == FRAMES
    assert "frame/s" in done.stderr  # the progress bar
    names = sorted(p.name for p in masks_dir.iterdir())
    assert names == [f"{i:06d}.png" for i in range(FRAMES)]
    masks = [np.asarray(Image.open(masks_dir / name)) for name in names]
    assert_masks_follow_the_disc(masks, truths)
    # The overlay: the disc tinted towards the person colour, the background as it was.
    first = next(read_frames(out))
    original = next(read_frames(path))
    inside, outside = truths[0] == RED, truths[0] == 0
    assert np.abs(first[outside].astype(int) - original[outside]).mean() < 4
    tinted = first[inside].mean(axis=0)
    expected = (original[inside].mean(axis=0) + PERSON_RGB) / 2
    assert np.abs(tinted - expected).max() < 12, (tinted, expected)


@pytest.mark.slow
def test_cli_mask_video_is_the_colour_mask(known_server, clip, tmp_path):
    path, truths = clip
    out = tmp_path / "mask.mkv"
    done = run_cli(
        "--target", known_server.target, "segment-video", str(path), "--out", str(out), "--mask", "--every", "2"
    )
    assert done.returncode == 0, done.stderr
    frames = list(read_frames(out))
    assert len(frames) == FRAMES and probe(out).rate == Fraction(25)
    person = [np.abs(f.astype(int) - PERSON_RGB).sum(axis=2) < 60 for f in frames]
    black = [f.astype(int).sum(axis=2) < 60 for f in frames]  # background is black in the VOC palette
    for index in range(FRAMES):
        truth = truths[index - index % 2]  # odd frames show the mask of the frame before
        assert iou(person[index].astype(np.uint8), (truth == RED).astype(np.uint8), 1) >= MIN_IOU, index
        assert black[index][truth == 0].mean() > 0.97, index
    assert np.abs(frames[1].astype(int) - frames[0]).mean() < 2  # frame 1 reuses frame 0's mask as it is


@pytest.mark.parametrize(
    ("name", "content", "expected"),
    [
        ("notes.mp4", b"these are words, not frames\n" * 20, "notes.mp4 is not a video we can read"),
        ("photo.png", None, "photo.png is an image, not a video"),
    ],
)
def test_cli_file_that_is_not_a_video_is_one_readable_line(tmp_path, name, content, expected):
    path = tmp_path / name
    if content is None:
        buffer = io.BytesIO()
        Image.new("RGB", (32, 32), "white").save(buffer, format="PNG")
        content = buffer.getvalue()
    path.write_bytes(content)
    done = run_cli("--target", "127.0.0.1:1", "segment-video", str(path), "--out", str(tmp_path / "o.mp4"))
    assert done.returncode == 1
    assert done.stderr.count("\n") == 1 and done.stderr.startswith("error: ") and expected in done.stderr, done.stderr
    assert not (tmp_path / "o.mp4").exists()


@pytest.mark.slow
def test_ctrl_c_stops_cleanly_and_leaves_a_playable_shorter_clip(known_server, tmp_path):
    path = tmp_path / "long.mp4"
    write_shapes_clip(path, 300)
    out, masks_dir = tmp_path / "cut.mp4", tmp_path / "masks"
    process = subprocess.Popen(
        [sys.executable, "-m", "client", "--target", known_server.target, "segment-video", str(path),
         "--out", str(out), "--masks-dir", str(masks_dir), "--window", "1"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=dict(os.environ),
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        while not (masks_dir.is_dir() and len(list(masks_dir.iterdir())) >= 5):
            assert process.poll() is None and time.monotonic() < deadline, process.stderr.read()  # type: ignore[union-attr]
            time.sleep(0.05)
        process.send_signal(signal.SIGINT)
        _, stderr = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 130, stderr
    assert "interrupted: wrote" in stderr and "Traceback" not in stderr
    written = len(list(read_frames(out)))  # decodes to the end: the file was finished, not cut off
    assert 5 <= written < 300
    assert f"wrote {written} frames" in stderr
    assert probe(out).rate == Fraction(25)


def test_cli_frames_the_server_refuses_are_written_unsegmented_and_counted(server, tmp_path):
    """The library's side of it: tests/client/test_library.py, with each client."""
    path = tmp_path / "small.mp4"
    write_shapes_clip(path, 6, 64, 48)
    done = run_cli(
        "--target", server.target, "segment-video", str(path), "--out", str(tmp_path / "o.mp4"), "--max-size", "5"
    )
    assert done.returncode == 1 and "error: 6 of 6 frames failed" in done.stderr and "Traceback" not in done.stderr
    assert len(list(read_frames(tmp_path / "o.mp4"))) == 6  # written unsegmented, the frame count kept
