"""The library's calls against a real server, each run with SegmentClient and with AsyncSegmentClient.

What the caller hands in (bytes, paths, PIL images, frames) and gets back (ids, sizes, masks, errors as
results or as SegmentError) must not depend on which client made the call.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest

from client import SegmentError
from tests.helpers.images import encode, photo_like
from tests.helpers.servers import ServerThread
from tests.helpers.video_clips import shapes_frames

# Small enough that the tests' photos above it go through SegmentUpload, in chunks.
SMALL_THRESHOLD = 4000


def test_segment_takes_bytes_paths_and_pil_images(
    connect_client: Callable[..., Any], server: ServerThread, tmp_path: Path
) -> None:
    path = tmp_path / "photo.png"
    path.write_bytes(encode(photo_like(90, 60)))
    with connect_client(server.target) as client:
        from_bytes = client.segment(encode(photo_like(80, 40)), image_id="one", overlay=True)
        from_path = client.segment(path)
        from_pil = client.segment(photo_like(30, 50), max_size=32)
    assert (from_bytes.id, from_bytes.mask.shape, from_bytes.mask_image.mode) == ("one", (40, 80), "P")
    assert from_bytes.overlay is not None and from_bytes.overlay.size == (80, 40)
    assert (from_path.id, from_path.mask.shape, from_path.overlay) == ("photo.png", (60, 90), None)
    assert from_pil.mask.shape == (50, 30) and max(from_pil.model_size) == 32


def test_images_above_the_upload_threshold_go_through_segment_upload(
    connect_client: Callable[..., Any], server: ServerThread
) -> None:
    data = encode(photo_like(120, 90))
    assert len(data) > SMALL_THRESHOLD
    with connect_client(server.target, upload_threshold=SMALL_THRESHOLD) as client:
        result = client.segment(data, image_id="big")
        streamed = {r.id: r for r in client.segment_many([encode(photo_like(20, 10)), data])}
    assert result.id == "big" and result.mask.shape == (90, 120)
    assert set(streamed) == {"0", "1"} and streamed["1"].mask.shape == (90, 120) and streamed["1"].ok


def test_segment_many_keeps_ids_and_reports_bad_items_as_results(
    connect_client: Callable[..., Any], server: ServerThread, jpeg_bytes: bytes, tmp_path: Path
) -> None:
    good = tmp_path / "good.jpg"
    good.write_bytes(jpeg_bytes)
    images = [good, b"garbage", encode(photo_like(30, 90)), tmp_path / "missing.png"]
    with connect_client(server.target) as client:
        results = {r.id: r for r in client.segment_many(images)}
    assert set(results) == {"good.jpg", "1", "2", "missing.png"}
    assert results["good.jpg"].ok and (results["2"].width, results["2"].height) == (30, 90)
    for bad, words in (("1", ""), ("missing.png", "cannot read image")):
        error = results[bad].error
        assert error is not None and error.code == grpc.StatusCode.INVALID_ARGUMENT and words in error.message


def test_a_refused_image_raises_segment_error_naming_it(
    connect_client: Callable[..., Any], server: ServerThread
) -> None:
    with connect_client(server.target) as client, pytest.raises(SegmentError) as refused:
        client.segment(b"", image_id="empty.png")
    assert refused.value.code == grpc.StatusCode.INVALID_ARGUMENT and "empty" in refused.value.message
    assert refused.value.image_id == "empty.png"


def test_model_info_models_and_health(connect_client: Callable[..., Any], server: ServerThread) -> None:
    with connect_client(server.target) as client:
        client.wait_until_serving(timeout=10)
        info = client.model_info()
        models = client.list_models()
        health = client.health(), client.health("segserve.v1.Segmenter")
        with pytest.raises(SegmentError) as unknown:
            client.model_info(model="no-such-model")
    assert info.model == "deeplabv3_mobilenet_v3_large" and len(info.labels) == 21
    assert [(m.name, m.state, m.is_default) for m in models] == [(info.name, "READY", True)]
    assert health == ("SERVING", "SERVING")
    assert unknown.value.code == grpc.StatusCode.NOT_FOUND


def test_frames_the_server_refuses_come_back_in_order_with_their_error(
    connect_client: Callable[..., Any], server: ServerThread
) -> None:
    frames, _ = shapes_frames(6, 64, 48)
    with connect_client(server.target) as client:
        results = list(client.segment_frames(frames, max_size=5, window=2))  # sizes 1-15 are refused
        skipped = list(client.segment_frames([np.asarray(photo_like(40, 30))] * 5, every=2, max_size=32))
    assert [r.index for r in results] == list(range(6))
    assert all(r.error is not None and r.error.code == grpc.StatusCode.INVALID_ARGUMENT for r in results)
    assert [(r.index, r.reused, r.ok) for r in skipped] == [(i, i % 2 == 1, True) for i in range(5)]
