"""Hostile tensors (issue 40, points 1 and 8): a request's shape is checked against the bytes it carries and
the server's limits before anything is built for it, on both doors through one place (protocol.images_of,
with the tensor codec under it), and no malformed input is a server error.

Unit tests of the codec, images_of and both converters; property-based tests that any shape, datatype and
size raises segserve's own errors only; and the cases of the issue through a real server on both doors."""

from __future__ import annotations

import json
import logging
import socket
import time
import tracemalloc
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import grpc
import httpx
import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from protos.inference import grpc_predict_v2_pb2 as pb
from protos.inference import grpc_predict_v2_pb2_grpc as pb_grpc
from server.errors import InvalidTensor, SegservError, TooManyImages
from server.grpc.inference_converters import request_from_proto
from server.inference import tensors
from server.inference.protocol import IMAGE, PIXELS, images_of
from server.inference.tensors import Contents, InputTensor
from server.rest.converters import request_from_http
from tests.helpers.servers import ServerThread

LIMIT = 64  # SEGSERVE_MAX_QUEUE's default
EMPTY_BATCH = 20_000_000
"""The issue's request: PIXELS [N,0,0,3] with no data, 63 bytes over gRPC, built N empty images."""
PEAK_BYTES = 4 * 1024 * 1024


class Untouchable(Sequence[object]):
    """Contents that declare `length` elements and fail the test if one is read: what is refused before its
    elements are looked at never reads them."""

    def __init__(self, length: int) -> None:
        self.length = length

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: Any) -> Any:
        raise AssertionError("an element was read before the shape was judged")

    def __iter__(self) -> Iterator[object]:
        raise AssertionError("the elements were iterated before the shape was judged")


def _refused(run: Callable[[], object]) -> tuple[SegservError, float, int]:
    """What `run` raised, how long it took and the peak of what it allocated (tracemalloc)."""
    tracemalloc.start()
    started = time.perf_counter()
    try:
        with pytest.raises(SegservError) as caught:
            run()
        return caught.value, time.perf_counter() - started, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


# ---- the empty batch and the batch size (point 1) ----------------------------------------------------------


def test_an_empty_pixels_batch_is_refused_by_both_converters_before_any_image_is_built() -> None:
    """[N,0,0,3] with no data passes every byte check; its N images must not be built to refuse it."""
    tensor = pb.ModelInferRequest.InferInputTensor(name=PIXELS, datatype="UINT8", shape=[EMPTY_BATCH, 0, 0, 3])
    message = pb.ModelInferRequest(model_name="m", inputs=[tensor])
    assert message.ByteSize() < 64
    body = json.dumps({"inputs": [{"name": PIXELS, "datatype": "UINT8", "shape": [EMPTY_BATCH, 0, 0, 3], "data": []}]})
    for parse in (
        lambda: request_from_proto(message),
        lambda: request_from_http("m", "", body.encode(), None, 1024)[0],
    ):
        error, seconds, peak = _refused(lambda: images_of(parse().inputs, LIMIT))  # noqa: B023
        assert isinstance(error, InvalidTensor) and "0x0 pixels; each side must be at least 1" in error.message
        assert "\n" not in error.message
        assert seconds < 1.0 and peak < PEAK_BYTES, (seconds, peak)


@pytest.mark.parametrize("shape", [[1, 0, 5, 3], [2, 5, 0, 3], [1, 0, 0, 3], [3, 2**40, 0, 3]])
def test_a_zero_size_image_is_invalid_argument_in_one_sentence(shape: list[int]) -> None:
    tensor = InputTensor(PIXELS, "UINT8", tuple(shape), Contents(raw=b""))
    with pytest.raises(InvalidTensor) as caught:
        images_of([tensor], LIMIT)
    message = caught.value.message
    assert f"{shape[2]}x{shape[1]} pixels; each side must be at least 1" in message and "\n" not in message


@pytest.mark.parametrize(
    ("name", "datatype", "shape"),
    [(IMAGE, "BYTES", (LIMIT + 1,)), (IMAGE, "BYTES", (10**9, 1)), (PIXELS, "UINT8", (LIMIT + 1, 2, 2, 3))],
)
def test_the_batch_size_is_judged_before_any_element_is_read(name: str, datatype: str, shape: tuple[int, ...]) -> None:
    """N past the queue limit is refused from the shape alone, for IMAGE and PIXELS alike: no element (an
    IMAGE's bytes, a PIXELS array) is decoded, whatever the contents claim."""
    count = int(np.prod(shape))
    for contents in (Contents(values=Untouchable(count)), Contents(values=Untouchable(count), element=bytes)):
        with pytest.raises(TooManyImages, match=f"can never fit the queue of {LIMIT}"):
            images_of([InputTensor(name, datatype, shape, contents)], LIMIT)


def test_a_full_pixels_batch_over_the_limit_costs_no_image() -> None:
    """[N,1,1,3] with all its bytes sent (within the message limit): refused before N arrays are made."""
    count = 1_000_000
    raw = bytes(count * 3)
    tensor = pb.ModelInferRequest.InferInputTensor(name=PIXELS, datatype="UINT8", shape=[count, 1, 1, 3])
    message = pb.ModelInferRequest(model_name="m", inputs=[tensor], raw_input_contents=[raw])
    request = request_from_proto(message)
    error, seconds, peak = _refused(lambda: images_of(request.inputs, LIMIT))
    assert isinstance(error, TooManyImages) and seconds < 1.0 and peak < PEAK_BYTES, (error, seconds, peak)


# ---- shapes no array can have (point 8) --------------------------------------------------------------------


def test_shapes_past_int64_are_invalid_on_both_converters() -> None:
    body = json.dumps({"inputs": [{"name": PIXELS, "datatype": "UINT8", "shape": [2**70, 0, 0, 3], "data": []}]})
    with pytest.raises(InvalidTensor, match="outside int64"):
        request_from_http("m", "", body.encode(), None, 1024)
    huge = json.dumps({"inputs": [{"name": IMAGE, "datatype": "BYTES", "shape": [-(10**4000 // 10**3900)]}]})
    with pytest.raises(InvalidTensor, match="outside int64"):
        request_from_http("m", "", huge.encode(), None, 1024)
    for shape in ([2**62, 0, 0, 3], [1, 0, 2**62, 3], [2**63 - 1, 1, 1, 3]):
        tensor = pb.ModelInferRequest.InferInputTensor(name=PIXELS, datatype="UINT8", shape=shape)
        request = request_from_proto(pb.ModelInferRequest(model_name="m", inputs=[tensor]))
        with pytest.raises((InvalidTensor, TooManyImages)):
            images_of(request.inputs, LIMIT)


# ---- any input raises segserve's errors only (point 8) -----------------------------------------------------

DIMENSIONS = st.one_of(
    st.integers(min_value=0, max_value=4),
    st.integers(min_value=-(2**64), max_value=2**64),
    st.sampled_from([0, 1, 3, LIMIT, LIMIT + 1, 2**31, 2**32, 2**62, 2**63 - 1, 2**63, -(2**63), 2**70]),
)
SHAPES = st.one_of(
    st.lists(DIMENSIONS, max_size=10),
    st.tuples(DIMENSIONS, DIMENSIONS, DIMENSIONS, st.just(3)).map(list),  # PIXELS' rank, so it reaches the sizes
)
DATATYPES = st.sampled_from([*tensors.DATATYPES, "BF16", "", "uint8"])
VALUES = st.one_of(
    st.lists(
        st.one_of(
            st.integers(min_value=-(2**70), max_value=2**70),
            st.floats(allow_nan=True, allow_infinity=True),
            st.booleans(),
            st.binary(max_size=8),
            st.text(max_size=4),
            st.none(),
            st.lists(st.integers(min_value=-300, max_value=300), max_size=3),
        ),
        max_size=12,
    ),
    # One kind of value each, so that decoding reaches the conversion to the datatype.
    st.lists(st.integers(min_value=-(2**70), max_value=2**70), max_size=12),
    st.lists(st.floats(allow_nan=True, allow_infinity=True), max_size=12),
    st.lists(st.booleans(), max_size=12),
    st.lists(st.binary(max_size=8), max_size=12),
)
CONTENTS = st.one_of(
    st.binary(max_size=64).map(lambda raw: Contents(raw=raw)),
    VALUES.map(lambda values: Contents(values=values)),
)
PROPERTY = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _only_segserve_errors(run: Callable[[], object]) -> object:
    try:
        return run()
    except SegservError:
        return None


@st.composite
def _fitting_shapes(draw: st.DrawFn, contents: Contents) -> list[int]:
    """Shapes whose element count matches what the contents hold (for one datatype), so that decoding
    goes past the count checks to the values themselves."""
    held = len(contents.raw) if contents.raw is not None else len(contents.values)
    shapes = [[held], [1, held], [held, 1], [held // 3, 1, 1, 3], [1, held // 6, 2, 3], [held // 2, 2]]
    return draw(st.sampled_from(shapes))


@PROPERTY
@given(
    name=st.sampled_from([IMAGE, PIXELS, "OTHER"]),
    datatype=DATATYPES,
    contents=CONTENTS,
    shape=st.one_of(SHAPES, st.none()),
    fitting=st.data(),
)
@example(name="OTHER", datatype="FP16", contents=Contents(values=[1e300]), shape=[1], fitting=None)
def test_the_codec_and_images_of_raise_segserve_errors_only(
    name: str, datatype: str, contents: Contents, shape: list[int] | None, fitting: st.DataObject
) -> None:
    """Never OverflowError, ValueError, MemoryError, IndexError or a numpy warning: a caller's tensor is
    decoded or refused with INVALID_ARGUMENT (or RESOURCE_EXHAUSTED past the queue)."""
    if shape is None:
        shape = fitting.draw(_fitting_shapes(contents))
    tensor = InputTensor(name, datatype, tuple(shape), contents)
    _only_segserve_errors(lambda: tensors.check_shape(name, shape))
    _only_segserve_errors(lambda: tensors.decode(tensor))
    images = _only_segserve_errors(lambda: images_of([tensor], 4))
    if isinstance(images, list):
        assert 1 <= len(images) <= 4


@PROPERTY
@given(n=DIMENSIONS, h=DIMENSIONS, w=DIMENSIONS, sent=st.integers(0, 64), fits=st.booleans())
@example(n=1, h=0, w=2**62, sent=0, fits=True)  # numpy: "array is too big", a ValueError
def test_pixels_of_any_size_raise_segserve_errors_only(n: int, h: int, w: int, sent: int, fits: bool) -> None:
    """PIXELS [N,H,W,3] with exactly its bytes (where they are few) or some other number of bytes."""
    declared = n * h * w * 3
    raw = bytes(declared if fits and 0 <= declared <= 4096 else sent)
    images = _only_segserve_errors(
        lambda: images_of([InputTensor(PIXELS, "UINT8", (n, h, w, 3), Contents(raw=raw))], 4)
    )
    if isinstance(images, list):
        assert len(images) == n <= 4 and h >= 1 and w >= 1 and all(image.shape == (h, w, 3) for image in images)


@PROPERTY
@given(datatype=DATATYPES, shape=st.lists(st.integers(min_value=-(2**63), max_value=2**63 - 1), max_size=10),
       raw=st.one_of(st.none(), st.binary(max_size=64)), values=st.lists(st.integers(0, 2**32 - 1), max_size=12),
       name=st.sampled_from([IMAGE, PIXELS]))  # fmt: skip
def test_grpc_requests_raise_segserve_errors_only(
    datatype: str, shape: list[int], raw: bytes | None, values: list[int], name: str
) -> None:
    tensor = pb.ModelInferRequest.InferInputTensor(name=name, datatype=datatype, shape=shape)
    if raw is None:
        tensor.contents.uint_contents.extend(values)
    message = pb.ModelInferRequest(model_name="m", inputs=[tensor], raw_input_contents=[] if raw is None else [raw])
    _only_segserve_errors(lambda: images_of(request_from_proto(message).inputs, 4))


@PROPERTY
@given(datatype=DATATYPES, shape=SHAPES, data=VALUES, name=st.sampled_from([IMAGE, PIXELS]))
def test_http_requests_raise_segserve_errors_only(
    datatype: str, shape: list[int], data: list[object], name: str
) -> None:
    body = {"inputs": [{"name": name, "datatype": datatype, "shape": shape, "data": data}]}
    encoded = json.dumps(body, default=lambda b: b.hex()).encode()  # binary values become strings
    _only_segserve_errors(lambda: images_of(request_from_http("m", "", encoded, None, 1024)[0].inputs, 4))


# ---- through a real server, both doors ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def stub(server: ServerThread) -> Iterator[pb_grpc.GRPCInferenceServiceStub]:
    with grpc.insecure_channel(server.target) as channel:
        yield pb_grpc.GRPCInferenceServiceStub(channel)


def _grpc_pixels(model: str, shape: list[int]) -> pb.ModelInferRequest:
    tensor = pb.ModelInferRequest.InferInputTensor(name=PIXELS, datatype="UINT8", shape=shape)
    return pb.ModelInferRequest(model_name=model, inputs=[tensor])


def _json_pixels(shape: list[int]) -> dict[str, Any]:
    return {"inputs": [{"name": PIXELS, "datatype": "UINT8", "shape": shape, "data": []}]}


def test_the_issues_requests_are_refused_cheaply_as_invalid_argument_on_both_doors(
    server: ServerThread, stub: pb_grpc.GRPCInferenceServiceStub, caplog: pytest.LogCaptureFixture
) -> None:
    model = server.app.pipeline.models.default_name
    url = f"http://127.0.0.1:{server.app.http_port}/v2/models/{model}/infer"
    caplog.set_level(logging.INFO)
    for shape in ([EMPTY_BATCH, 0, 0, 3], [2**62, 0, 0, 3]):
        started = time.perf_counter()
        with pytest.raises(grpc.RpcError) as caught:
            stub.ModelInfer(_grpc_pixels(model, shape), timeout=30)
        seconds, details = time.perf_counter() - started, caught.value.details() or ""
        assert seconds < 1.0 and caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (shape, seconds, details)
        assert "each side must be at least 1" in details
    for shape in ([EMPTY_BATCH, 0, 0, 3], [2**70, 0, 0, 3]):
        started = time.perf_counter()
        answer = httpx.post(url, json=_json_pixels(shape), timeout=30)
        assert answer.status_code == 400 and time.perf_counter() - started < 1.0, (shape, answer.text)
    # The refusal costs the server nothing it keeps: measured in-process, over the whole call.
    tracemalloc.start()
    try:
        with pytest.raises(grpc.RpcError):
            stub.ModelInfer(_grpc_pixels(model, [EMPTY_BATCH, 0, 0, 3]), timeout=30)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < PEAK_BYTES, peak
    assert not [r for r in caplog.records if r.exc_info or r.levelno >= logging.ERROR]


@pytest.mark.parametrize("value", ["²".encode("latin-1"), "²".encode(), "\u0661".encode(), b"1" * 40, b"-1", b"0x10"])
def test_a_malformed_inference_header_length_is_400(server: ServerThread, value: bytes) -> None:
    model = server.app.pipeline.models.default_name
    url = f"http://127.0.0.1:{server.app.http_port}/v2/models/{model}/infer"
    answer = httpx.post(url, content=b"{}", headers={"Inference-Header-Content-Length": value}, timeout=30)
    assert answer.status_code == 400, (value, answer.status_code, answer.text)
    assert "Inference-Header-Content-Length" in answer.json()["error"]


def test_a_caller_that_hangs_up_mid_body_is_a_quiet_cancellation(
    server: ServerThread, caplog: pytest.LogCaptureFixture
) -> None:
    """Half a body, then the socket closes: counted CANCELLED (not INTERNAL), no traceback in the log."""
    metrics = server.app.metrics
    assert metrics is not None

    def count(code: str) -> float:
        labels = {"protocol": "inference-http", "code": code}
        return metrics.registry.get_sample_value("segserve_protocol_requests_total", labels) or 0.0

    caplog.set_level(logging.INFO)
    before = count("CANCELLED"), count("INTERNAL")
    model = server.app.pipeline.models.default_name
    head = (
        f"POST /v2/models/{model}/infer HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        "Content-Length: 100000\r\n\r\n"
    )
    with socket.create_connection(("127.0.0.1", server.app.http_port), timeout=10) as sock:
        sock.sendall(head.encode() + b'{"inputs": [' + b" " * 50_000)
        time.sleep(0.2)  # the body is being read when the caller leaves
    deadline = time.monotonic() + 10
    while count("CANCELLED") == before[0] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert (count("CANCELLED"), count("INTERNAL")) == (before[0] + 1, before[1])
    noisy = [r for r in caplog.records if r.exc_info or r.levelno >= logging.ERROR]
    assert not noisy, [r.getMessage() for r in noisy]
