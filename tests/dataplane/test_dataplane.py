"""Unit tests of the data plane at its seam (server/dataplane/plane.py), without a door: a pipeline with random
weights, called as a door calls it, with the door's part (reading chunks, parsing stream messages) played by
plain functions. What the doors add (statuses, serialising) is tested in tests/grpc and tests/rest."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from dataclasses import replace

import grpc
import numpy as np
import pytest

from server.core.model_pipeline import ModelPipeline
from server.core.pipeline import SegmentationPipeline
from server.core.types import ResolvedOptions, SegmentOptions, SegmentResult
from server.dataplane import DataPlane, SegmentCall, UploadChunk
from server.dataplane.types import ModelState
from server.errors import ImageTooLarge, InvalidOptions, ModelControlRefused, SegservError, UploadStalled
from server.inference.protocol import InferRequest
from server.inference.tensors import BYTES, Contents, InputTensor
from tests.helpers.images import encode, photo_like
from tests.helpers.servers import make_settings

PHOTO = encode(photo_like(96, 72), "JPEG")
BIG = encode(photo_like(1600, 1200), "PNG")


@pytest.fixture
async def plane() -> AsyncIterator[DataPlane]:
    pipeline = SegmentationPipeline(
        make_settings(runtime="torch", warmup=False, upload_idle_timeout_s=0.3, max_image_bytes=len(BIG) + 1000)
    )
    await pipeline.start()
    yield DataPlane(pipeline)
    await pipeline.close()


def chunks_of(data: bytes, size: int, first: UploadChunk | None = None) -> Iterator[UploadChunk]:
    pieces = [data[i : i + size] for i in range(0, len(data), size)]
    yield first or UploadChunk(pieces[0], "up", SegmentOptions())
    for piece in pieces[1:]:
        yield UploadChunk(piece)


def reader(chunks: Iterator[UploadChunk], read: list[int], stall_after: int | None = None):  # type: ignore[no-untyped-def]
    async def next_chunk() -> UploadChunk | None:
        if stall_after is not None and len(read) >= stall_after:
            await asyncio.sleep(60)
        chunk = next(chunks, None)
        if chunk is not None:
            read.append(len(chunk.data))
        return chunk

    return next_chunk


async def test_an_upload_answers_as_the_whole_image_does(plane: DataPlane) -> None:
    whole = await plane.segment("one", PHOTO, SegmentOptions(), None)
    read: list[int] = []
    request_id, uploaded = await plane.segment_upload(reader(chunks_of(PHOTO, 1000), read), None)
    assert request_id == "up" and sum(read) == len(PHOTO) and len(read) > 1
    assert uploaded.mask_png == whole.mask_png
    assert plane.pipeline.uploads.in_flight == 0 and plane.pipeline.admission.taken == 0


async def test_an_upload_past_the_limit_is_refused_without_reading_the_rest(plane: DataPlane) -> None:
    limit = plane.max_image_bytes
    read: list[int] = []
    with pytest.raises(ImageTooLarge):
        await plane.segment_upload(reader(chunks_of(b"x" * (limit * 3), limit // 4), read), None)
    assert sum(read) <= limit + limit // 4  # stopped at the chunk that passed the limit, of 12
    assert plane.pipeline.uploads.in_flight == 0 and plane.pipeline.admission.taken == 0


async def test_options_on_a_later_chunk_are_refused(plane: DataPlane) -> None:
    chunks = iter([UploadChunk(PHOTO[:100], "a"), UploadChunk(PHOTO[100:], "b")])
    with pytest.raises(InvalidOptions, match="first chunk only"):
        await plane.segment_upload(reader(chunks, []), None)


async def test_a_stalled_upload_and_a_stalled_body_give_their_bytes_back(plane: DataPlane) -> None:
    read: list[int] = []
    with pytest.raises(UploadStalled, match="no chunk"):
        await plane.segment_upload(reader(chunks_of(PHOTO, 500), read, stall_after=2), None)
    assert read == [500, 500] and plane.pipeline.uploads.in_flight == 0

    async def body() -> AsyncIterator[bytes]:
        yield b"x" * 1000
        await asyncio.sleep(60)
        yield b"never"

    with pytest.raises(UploadStalled, match="body stalled"):
        await plane.read_body(body(), 10_000, "a test body", None)
    assert plane.pipeline.uploads.in_flight == 0


async def test_a_body_is_refused_by_its_declared_length_before_a_byte_is_read(plane: DataPlane) -> None:
    read = 0

    async def body() -> AsyncIterator[bytes]:
        nonlocal read
        read += 1
        yield b"x"

    with pytest.raises(ImageTooLarge, match="takes at most 100"):
        await plane.read_body(body(), 100, "a test body", 101)
    assert read == 0
    assert await plane.read_body(body(), 100, "a test body", 1) == b"x"


class Codec:
    """A door's stream codec, over plain tuples: (id, image) in, (id, what) out."""

    @staticmethod
    def size(message: tuple[str, bytes]) -> int:
        return len(message[1])

    @staticmethod
    def request_id(message: tuple[str, bytes]) -> str:
        return message[0]

    @staticmethod
    def parse(message: tuple[str, bytes]) -> SegmentCall:
        return SegmentCall(message[0], message[1], SegmentOptions())

    @staticmethod
    def answer(request_id: str, result: SegmentResult) -> tuple[str, str]:
        return request_id, "ok"

    @staticmethod
    def error(request_id: str, error: SegservError) -> tuple[str, str]:
        return request_id, error.code.name

    @staticmethod
    def answer_size(answer: tuple[str, str]) -> int:
        return 1


def messages(*items: tuple[str, bytes]):  # type: ignore[no-untyped-def]
    queue = list(items)

    async def read() -> tuple[str, bytes] | None:
        return queue.pop(0) if queue else None

    return read


async def test_segment_stream_answers_as_ready_and_counts_the_stream(plane: DataPlane) -> None:
    streams = plane.pipeline.streams
    answers = []
    async for answer in plane.segment_stream(messages(("slow", BIG), ("bad", b"junk")), Codec(), None):
        answers.append(answer)
        assert streams.open_streams == 1
    assert answers == [("bad", "INVALID_ARGUMENT"), ("slow", "ok")]  # the quick refusal is not held back
    assert streams.open_streams == 0 and plane.pipeline.admission.taken == 0


class InferCodec(Codec):
    def __init__(self, model: str) -> None:
        self.model = model

    def parse(self, message: tuple[str, bytes]) -> InferRequest:  # type: ignore[override]
        return InferRequest(
            self.model, "", message[0], [InputTensor("IMAGE", BYTES, (1,), Contents(values=[message[1]]))]
        )

    @staticmethod
    def answer(request_id: str, result: object) -> tuple[str, str]:  # type: ignore[override]
        return request_id, "ok"


async def test_infer_stream_answers_in_order_through_the_same_engine(plane: DataPlane) -> None:
    streams = plane.pipeline.streams
    answers = []
    async for answer in plane.infer_stream(
        messages(("slow", BIG), ("bad", b"junk")), InferCodec(plane.model_info("").name), None
    ):
        answers.append(answer)
        assert streams.open_streams == 1  # counted as SegmentStream is
    assert answers == [("slow", "ok"), ("bad", "INVALID_ARGUMENT")]
    assert streams.open_streams == 0


async def test_the_index_reads_shutting_down_while_draining(plane: DataPlane) -> None:
    assert [e.state for e in plane.index()] == ["READY"]
    plane.pipeline.draining = True
    assert [(e.state, e.reason) for e in plane.index()] == [("UNAVAILABLE", "shutting down")]
    assert not plane.ready


async def test_model_control_off_is_refused_before_any_token_is_asked(plane: DataPlane) -> None:
    with pytest.raises(ModelControlRefused):
        await plane.load("anything", {}, None)


async def test_model_info_and_description_come_from_the_one_model(plane: DataPlane) -> None:
    info = plane.model_info("")
    description = plane.describe(info.name)
    assert description.name == info.name and description.labels == info.labels
    assert description.max_batch_size == info.max_queue
    assert info.runtime != "loading" and np.sum(info.batch_sizes) >= 0


async def test_every_call_resolves_its_options_once_and_refuses_them_before_its_image_is_read(
    plane: DataPlane, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Options are checked once, against the model the call holds, whichever way the image comes (a ModelInfer
    of two images included), and what the model runs with is what they asked for. Options the model refuses
    are refused before the image is read."""
    resolved: list[SegmentOptions] = []
    real = ModelPipeline.resolve

    def counted(model: ModelPipeline, options: SegmentOptions) -> ResolvedOptions:
        resolved.append(options)
        return real(model, options)

    monkeypatch.setattr(ModelPipeline, "resolve", counted)
    options = SegmentOptions(max_size=48, overlay=True)
    results = [await plane.segment("whole", PHOTO, options, None)]
    upload = iter([UploadChunk(PHOTO[:1000], "up", options), UploadChunk(PHOTO[1000:])])
    results.append((await plane.segment_upload(reader(upload, []), None))[1])
    parse = Codec.parse

    def parse_with_options(message: tuple[str, bytes]) -> SegmentCall:
        return replace(parse(message), options=options)

    monkeypatch.setattr(Codec, "parse", staticmethod(parse_with_options))
    results += [result async for _, result in plane.segment_stream(messages(("s", PHOTO)), AnswerCodec(), None)]
    assert len(resolved) == 3
    two = InputTensor("IMAGE", BYTES, (2,), Contents(values=[PHOTO, PHOTO]))
    inferred = await plane.infer(InferRequest(plane.model_info("").name, "", "two", [two]))
    assert len(resolved) == 4 and len(inferred.results) == 2
    for result in results:
        assert max(result.model_width, result.model_height) == 48 and result.overlay_png
    read = []

    async def read_image() -> bytes:
        read.append(1)
        return PHOTO

    with pytest.raises(InvalidOptions, match="max_size"):
        await plane.segment("refused", read_image, SegmentOptions(max_size=3), None)
    assert not read and plane.pipeline.admission.taken == 0


class AnswerCodec(Codec):
    """Codec's, answering the result itself."""

    @staticmethod
    def answer(request_id: str, result: SegmentResult) -> tuple[str, SegmentResult]:  # type: ignore[override]
        return request_id, result


async def test_the_protocol_refuses_an_empty_model_name_alike_whatever_the_default_s_state(plane: DataPlane) -> None:
    """The inference protocol always names its model: an empty name is NOT_FOUND, the same while the default
    model cannot serve (it was UNAVAILABLE then, as if a retry could help) as once it can."""
    default = plane.pipeline.models.get("")
    refusals = []
    for state in (ModelState.LOADING, ModelState.READY):
        default.state = state
        for call in (plane.describe, plane.model_ready):
            with pytest.raises(SegservError) as refused:
                call("")
            refusals.append((refused.value.code, refused.value.message))
        image = InputTensor("IMAGE", BYTES, (1,), Contents(values=[PHOTO]))
        with pytest.raises(SegservError) as refused:
            await plane.infer(InferRequest("", "", "unnamed", [image]))
        refusals.append((refused.value.code, refused.value.message))
    assert {code for code, _ in refusals} == {grpc.StatusCode.NOT_FOUND}
    assert all("unknown model ''" in message for _, message in refusals)
