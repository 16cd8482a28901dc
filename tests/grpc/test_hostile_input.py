"""Whatever callers send: each bad input gets its status and a readable message, odd-but-valid images
get a mask of the right size, and the server stays SERVING with bounded memory afterwards."""

from __future__ import annotations

import io
from collections.abc import Callable

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from client import SegmentClient
from protos.segserve.v1 import segserve_pb2 as pb
from protos.segserve.v1 import segserve_pb2_grpc as pb_grpc
from server.core.imaging import Limits, decode_image
from server.errors import ImageTooLarge, InvalidImage
from tests.helpers.images import animated_gif, cmyk_jpeg, encode, photo_like, png16, png_declaring
from tests.helpers.servers import ServerThread

OK = grpc.StatusCode.OK
INVALID = grpc.StatusCode.INVALID_ARGUMENT
EXHAUSTED = grpc.StatusCode.RESOURCE_EXHAUSTED


def palette_png_with_transparency() -> bytes:
    image = photo_like(50, 40).convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    return encode(image, transparency=0)


def exif_rotated_jpeg() -> bytes:
    exif = Image.Exif()
    exif[0x0112] = 6  # displayed rotated 90 degrees clockwise: width and height swap
    return encode(photo_like(80, 40), "JPEG", exif=exif)


JPEG = encode(photo_like(160, 120), "JPEG", quality=90)
PNG = encode(photo_like(160, 120))

# (name, bytes, expected status, words in the message, or the mask's (width, height) when OK)
CASES: list[tuple[str, Callable[[], bytes], grpc.StatusCode, str | tuple[int, int]]] = [
    ("zero-bytes", lambda: b"", INVALID, "empty"),
    ("random-bytes", lambda: np.random.default_rng(7).bytes(4096), INVALID, "cannot identify image format"),
    ("text", lambda: b"GET / HTTP/1.1\r\nHost: example.org\r\n\r\n" * 20, INVALID, "cannot identify image format"),
    ("truncated-jpeg", lambda: JPEG[: len(JPEG) // 2], INVALID, "truncated"),
    ("truncated-png", lambda: PNG[: len(PNG) // 2], INVALID, "image"),
    (
        "bomb-30000x30000",
        lambda: png_declaring(30000, 30000),
        EXHAUSTED,
        "declares 900000000 pixels; the limit is 50000000",
    ),
    ("over-pixel-limit-8000x8000", lambda: png_declaring(8000, 8000), EXHAUSTED, "8000x8000 = 64000000 pixels"),
    ("1x1", lambda: encode(Image.new("RGB", (1, 1), "blue")), OK, (1, 1)),
    ("100000x10", lambda: encode(Image.new("RGB", (100000, 10), "green")), OK, (100000, 10)),
    ("cmyk-jpeg", cmyk_jpeg, OK, (64, 48)),
    ("16-bit-png", png16, OK, (80, 40)),
    ("palette-png-transparency", palette_png_with_transparency, OK, (50, 40)),
    ("animated-gif", animated_gif, OK, (40, 30)),
    ("webp", lambda: encode(photo_like(70, 50), "WEBP"), OK, (70, 50)),
    ("exif-rotated-jpeg", exif_rotated_jpeg, OK, (40, 80)),
]


def status_of(stub: pb_grpc.SegmenterStub, data: bytes) -> tuple[grpc.StatusCode, str, pb.SegmentResponse | None]:
    try:
        response = stub.Segment(pb.SegmentRequest(id="x", image=data), timeout=60)
    except grpc.RpcError as exc:
        return exc.code(), exc.details() or "", None
    return OK, "", response


@pytest.fixture
def stub(server: ServerThread):  # type: ignore[no-untyped-def]
    with grpc.insecure_channel(server.target) as channel:
        yield pb_grpc.SegmenterStub(channel)


def assert_serving(server: ServerThread) -> None:
    with grpc.insecure_channel(server.target) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        status = health.Check(health_pb2.HealthCheckRequest(service="segserve.v1.Segmenter"), timeout=10).status
        assert status == health_pb2.HealthCheckResponse.SERVING
        assert pb_grpc.SegmenterStub(channel).Segment(pb.SegmentRequest(image=JPEG), timeout=60).width == 160


@pytest.mark.parametrize(("name", "make", "code", "expect"), CASES, ids=[c[0] for c in CASES])
def test_each_input_gets_its_status_and_a_readable_message(
    stub: pb_grpc.SegmenterStub,
    server: ServerThread,
    name: str,
    make: Callable[[], bytes],
    code: grpc.StatusCode,
    expect: str | tuple[int, int],
) -> None:
    got, details, response = status_of(stub, make())
    assert got == code, f"{name}: {got} {details}"
    if code == OK:
        assert response is not None
        assert (response.width, response.height) == expect
        mask = Image.open(io.BytesIO(response.mask_png))
        assert mask.size == expect and mask.mode == "P"
    else:
        assert isinstance(expect, str) and expect in details, details
        assert "Traceback" not in details and len(details) < 300
    assert_serving(server)


def test_bad_inputs_in_a_stream_fail_alone(client: SegmentClient) -> None:
    images = [case[1]() for case in CASES if case[0] != "100000x10"]
    results = {r.id: r for r in client.segment_many(images)}
    assert len(results) == len(images)
    for index, case in enumerate(c for c in CASES if c[0] != "100000x10"):
        result = results[str(index)]
        if case[2] == OK:
            assert result.ok and (result.width, result.height) == case[3], case[0]
        else:
            assert result.error is not None and result.error.code == case[2], case[0]


def rss_bytes() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


MEMORY_ROUNDS = 6
MEMORY_BOUND = 64 * 1024 * 1024


def test_memory_stays_bounded_after_rounds_of_hostile_input(stub: pb_grpc.SegmenterStub, server: ServerThread) -> None:
    """The server runs in this process, so this process's RSS is the server's (plus pytest's, which is steady)."""
    inputs = [case[1]() for case in CASES]

    def one_round() -> None:
        for data in inputs:
            status_of(stub, data)

    one_round()  # allocator pools and caches reach their working size
    start = rss_bytes()
    for _ in range(MEMORY_ROUNDS):
        one_round()
    growth = rss_bytes() - start
    print(f"RSS {start / 2**20:.1f} MiB after one round, grew {growth / 2**20:.1f} MiB over {MEMORY_ROUNDS} more")
    assert growth < MEMORY_BOUND, f"RSS grew {growth / 2**20:.1f} MiB over {MEMORY_ROUNDS} rounds"
    assert_serving(server)


# ---- property-based fuzzing of the decode path ------------------------------------------------

SEEDS = {
    "png": PNG,
    "jpeg": JPEG,
    "gif": animated_gif(),
    "webp": encode(photo_like(40, 30), "WEBP"),
    "bmp": encode(photo_like(20, 10), "BMP"),
    "tiff": encode(photo_like(20, 10), "TIFF"),
    "png16": png16(),
}
FUZZ_LIMITS = Limits(max_bytes=1024 * 1024, max_pixels=2_000_000)


@st.composite
def mutated_images(draw: st.DrawFn) -> bytes:
    """A real image with bytes flipped, a slice cut out, or its tail cut off: close enough to get past the header."""
    data = bytearray(SEEDS[draw(st.sampled_from(sorted(SEEDS)))])
    for _ in range(draw(st.integers(0, 8))):
        data[draw(st.integers(0, len(data) - 1))] = draw(st.integers(0, 255))
    if draw(st.booleans()):
        start = draw(st.integers(0, len(data) - 1))
        del data[start : start + draw(st.integers(1, 64))]
    if draw(st.booleans()):
        data = data[: draw(st.integers(0, len(data)))]
    return bytes(data)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mutated_images(), st.booleans())
def test_mutated_images_decode_or_fail_with_our_errors(data: bytes, keep_full: bool) -> None:
    try:
        decoded = decode_image(data, 64, FUZZ_LIMITS, keep_full)
    except (InvalidImage, ImageTooLarge) as exc:
        message = str(exc)
        assert message  # a caller always learns why
        return
    assert decoded.model_input.mode == "RGB" and max(decoded.model_input.size) <= 64
    assert min(decoded.model_input.size) >= 1


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(mutated_images())
def test_mutated_images_over_grpc_never_get_internal(stub: pb_grpc.SegmenterStub, data: bytes) -> None:
    code, details, response = status_of(stub, data)
    assert code in (OK, INVALID, EXHAUSTED), f"{code}: {details}"
    if response is not None:
        assert Image.open(io.BytesIO(response.mask_png)).size == (response.width, response.height)
