"""End to end over real gRPC: every RPC, health, reflection, each error code."""

from __future__ import annotations

import io

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from PIL import Image

from client import SegmentClient, SegmentError
from protos.segserve.v1 import segserve_pb2 as pb
from protos.segserve.v1 import segserve_pb2_grpc as pb_grpc
from tests.helpers.images import encode, photo_like, png_declaring
from tests.helpers.servers import TEST_MAX_SIZE, ServerThread


@pytest.fixture
def stub(server: ServerThread):  # type: ignore[no-untyped-def]
    with grpc.insecure_channel(server.target) as channel:
        yield pb_grpc.SegmenterStub(channel)


def test_segment_returns_a_voc_palette_mask_of_the_input_size(client: SegmentClient, jpeg_bytes: bytes) -> None:
    result = client.segment(jpeg_bytes, image_id="one", overlay=True)
    assert result.id == "one"
    assert (result.width, result.height) == (160, 120)
    mask = Image.open(io.BytesIO(result.mask_png))
    assert mask.mode == "P" and mask.size == (160, 120)
    palette = mask.getpalette()
    assert palette is not None and palette[3:6] == [128, 0, 0]  # class 1, aeroplane, VOC maroon
    assert result.mask.shape == (120, 160) and int(result.mask.max()) <= 20
    assert result.model_size == (TEST_MAX_SIZE, 48)
    assert result.overlay is not None and result.overlay.size == (160, 120)
    assert abs(sum(c.fraction for c in result.classes) - 1) < 1e-4
    counts = np.bincount(result.mask.ravel(), minlength=21)
    for share in result.classes:
        assert share.fraction == pytest.approx(counts[share.index] / result.mask.size, abs=1e-6)
    assert result.timing.batch_size >= 1 and result.timing.total_ms > 0


def test_no_overlay_unless_asked(client: SegmentClient, jpeg_bytes: bytes) -> None:
    assert client.segment(jpeg_bytes).overlay is None


def test_overlay_leaves_background_untouched_at_zero_opacity(client: SegmentClient) -> None:
    image = photo_like(50, 40, seed=3)
    result = client.segment(encode(image), overlay=True, overlay_opacity=0.0)
    assert result.overlay is not None
    assert np.array_equal(np.asarray(result.overlay.convert("RGB")), np.asarray(image))


def test_exif_rotated_jpeg_gets_a_mask_in_the_rotated_size(client: SegmentClient) -> None:
    exif = Image.Exif()
    exif[0x0112] = 8
    result = client.segment(encode(photo_like(120, 60), "JPEG", exif=exif))
    assert (result.width, result.height) == (60, 120)
    assert result.mask.shape == (120, 60)


def test_panorama_10000x10(client: SegmentClient) -> None:
    result = client.segment(encode(photo_like(10000, 10)))
    assert (result.width, result.height) == (10000, 10)
    assert result.mask.shape == (10, 10000)


def test_large_image_goes_through_segment_upload(server: ServerThread) -> None:
    noise = np.random.default_rng(1).integers(0, 255, (1400, 1200, 3), dtype=np.uint8)
    data = encode(Image.fromarray(noise))
    assert len(data) > 4 * 1024 * 1024
    with SegmentClient(server.target) as c:
        result = c.segment(data, image_id="big")
    assert result.id == "big" and result.mask.shape == (1400, 1200)


def test_unary_segment_refuses_messages_over_the_limit(stub: pb_grpc.SegmenterStub, server: ServerThread) -> None:
    too_big = b"\0" * (server.settings.max_message_bytes + 1)
    with pytest.raises(grpc.RpcError) as info:
        stub.Segment(pb.SegmentRequest(image=too_big))
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


def test_upload_rules(stub: pb_grpc.SegmenterStub, jpeg_bytes: bytes) -> None:
    with pytest.raises(grpc.RpcError) as info:
        stub.SegmentUpload(iter([]))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "no chunks" in (info.value.details() or "")
    chunks = [
        pb.ImageChunk(id="x", data=jpeg_bytes[:100]),
        pb.ImageChunk(options=pb.SegmentOptions(overlay=True), data=jpeg_bytes[100:]),
    ]
    with pytest.raises(grpc.RpcError) as info:
        stub.SegmentUpload(iter(chunks))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "first chunk" in (info.value.details() or "")
    response = stub.SegmentUpload(
        iter([pb.ImageChunk(id="x", data=jpeg_bytes[:100]), pb.ImageChunk(data=jpeg_bytes[100:])])
    )
    assert response.id == "x" and response.width == 160


def test_segment_stream_keeps_ids_and_reports_bad_items(client: SegmentClient, jpeg_bytes: bytes) -> None:
    images = [jpeg_bytes, b"garbage", encode(photo_like(30, 90)), jpeg_bytes]
    results = {r.id: r for r in client.segment_many(images)}
    assert set(results) == {"0", "1", "2", "3"}
    assert results["1"].error is not None and results["1"].error.code == grpc.StatusCode.INVALID_ARGUMENT
    assert (results["2"].width, results["2"].height) == (30, 90)
    assert all(results[i].ok for i in "023")


def test_get_model_info(client: SegmentClient, server: ServerThread) -> None:
    info = client.model_info()
    assert info.model == "deeplabv3_mobilenet_v3_large"
    assert info.weights == "random" and not info.weights_are_trained
    assert info.device == "cpu" and info.max_size == TEST_MAX_SIZE and info.max_batch_size == 8
    # Which runtime serves is auto's measurement on this machine; what is reported must be what runs.
    served = server.app.pipeline.runtime
    assert served is not None and info.runtime == served.description
    assert info.runtime.split()[0] in ("onnxruntime", "openvino", "torch") and "auto: fastest of" in info.runtime
    # Random weights paint one class everywhere: no agreement may be claimed, whatever precision won here.
    assert "pixel agreement" not in info.runtime, info.runtime
    if served.precision != "fp32":
        assert "agreement with fp32 not judged" in info.runtime, info.runtime
    assert len(info.labels) == 21
    assert (info.labels[15].name, info.labels[15].color) == ("person", "#c08080")


@pytest.mark.parametrize(
    ("image", "options", "code", "words"),
    [
        (b"", {}, grpc.StatusCode.INVALID_ARGUMENT, "empty"),
        (b"\x89PNG\r\n\x1a\n broken", {}, grpc.StatusCode.INVALID_ARGUMENT, "image"),
        (None, {"max_size": 3}, grpc.StatusCode.INVALID_ARGUMENT, "max_size"),
        (None, {"overlay_opacity": 1.5}, grpc.StatusCode.INVALID_ARGUMENT, "overlay_opacity"),
        ("bomb", {}, grpc.StatusCode.RESOURCE_EXHAUSTED, "pixels"),
    ],
    ids=["empty", "undecodable", "max-size", "opacity", "too-many-pixels"],
)
def test_error_codes_and_messages(
    stub: pb_grpc.SegmenterStub,
    jpeg_bytes: bytes,
    image: bytes | str | None,
    options: dict,
    code: grpc.StatusCode,
    words: str,
) -> None:
    data = {None: jpeg_bytes, "bomb": png_declaring(30000, 30000)}.get(image, image)  # type: ignore[call-overload]
    with pytest.raises(grpc.RpcError) as info:
        stub.Segment(pb.SegmentRequest(image=data, options=pb.SegmentOptions(**options)))
    assert info.value.code() == code
    details = info.value.details() or ""
    assert words in details and "Traceback" not in details
    assert stub.Segment(pb.SegmentRequest(image=jpeg_bytes)).width == 160  # still serving


def test_max_size_above_the_server_cap_is_capped(client: SegmentClient, jpeg_bytes: bytes) -> None:
    assert client.segment(jpeg_bytes, max_size=4000).model_size == (TEST_MAX_SIZE, 48)
    assert client.segment(jpeg_bytes, max_size=32).model_size == (32, 24)


def test_health_and_reflection(server: ServerThread) -> None:
    with grpc.insecure_channel(server.target) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", "segserve.v1.Segmenter"):
            status = health.Check(health_pb2.HealthCheckRequest(service=service)).status
            assert status == health_pb2.HealthCheckResponse.SERVING
        reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
        answers = reflection.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
        names = {s.name for answer in answers for s in answer.list_services_response.service}
    assert {"segserve.v1.Segmenter", "grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection"} <= names


def test_client_errors_carry_the_status(client: SegmentClient) -> None:
    with pytest.raises(SegmentError) as info:
        client.segment(b"")
    assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT and "empty" in str(info.value)
