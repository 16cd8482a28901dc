"""The Segmenter servicer: thin. Messages in, pipeline call, messages out; errors become statuses here."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable
from typing import TypeVar

import grpc

from protos.segserve.v1 import segserve_pb2 as pb
from protos.segserve.v1 import segserve_pb2_grpc as pb_grpc
from server import converters
from server.errors import ImageTooLarge, InvalidImage, InvalidOptions, SegservError
from server.interceptor import Context, ImageNote, note_image
from server.pipeline import SegmentationPipeline

log = logging.getLogger(__name__)

T = TypeVar("T")

# Images in flight per SegmentStream call; beyond this the stream stops reading until one finishes.
STREAM_WINDOW = 16


def _deadline(context: Context) -> float | None:
    remaining = context.time_remaining()
    return None if remaining is None else time.monotonic() + remaining


async def _guarded(context: Context, call: Awaitable[T]) -> T:
    """Runs a call, turning SegservError into its status and anything else into INTERNAL (logged)."""
    try:
        return await call
    except SegservError as exc:
        await context.abort(exc.code, exc.message)
    except (asyncio.CancelledError, grpc.aio.AbortError):
        raise
    except Exception:
        log.exception("unexpected error")
        await context.abort(grpc.StatusCode.INTERNAL, "internal error; see the server log")
    raise AssertionError("unreachable: abort raises")


class SegmenterServicer(pb_grpc.SegmenterServicer):
    def __init__(self, pipeline: SegmentationPipeline) -> None:
        self.pipeline = pipeline

    async def Segment(self, request: pb.SegmentRequest, context: Context) -> pb.SegmentResponse:
        return await _guarded(context, self._segment(request.id, request.image, request.options, _deadline(context)))

    async def SegmentUpload(
        self, request_iterator: AsyncIterator[pb.ImageChunk], context: Context
    ) -> pb.SegmentResponse:
        return await _guarded(context, self._upload(request_iterator, _deadline(context)))

    async def SegmentStream(
        self, request_iterator: AsyncIterator[pb.SegmentRequest], context: Context
    ) -> AsyncIterator[pb.SegmentResponse]:
        deadline = _deadline(context)
        results: asyncio.Queue[pb.SegmentResponse | None] = asyncio.Queue()
        # Never more than the queue admits, so a lone stream is never refused for its own items.
        window = asyncio.Semaphore(min(STREAM_WINDOW, self.pipeline.settings.max_queue))

        async def one(request: pb.SegmentRequest) -> None:
            try:
                await results.put(await self._segment(request.id, request.image, request.options, deadline))
            except SegservError as exc:
                note_image(ImageNote(request.id, code=exc.code.name))
                await results.put(converters.error_to_proto(request.id, exc))
            except Exception:
                log.exception("unexpected error in stream item %r", request.id)
                note_image(ImageNote(request.id, code=grpc.StatusCode.INTERNAL.name))
                await results.put(
                    pb.SegmentResponse(
                        id=request.id, error=pb.Error(code=grpc.StatusCode.INTERNAL.value[0], message="internal error")
                    )
                )
            finally:
                window.release()

        async def read_all() -> None:
            async with asyncio.TaskGroup() as group:
                async for request in request_iterator:
                    await window.acquire()
                    group.create_task(one(request))
            await results.put(None)

        reader = asyncio.create_task(read_all())
        try:
            while (response := await results.get()) is not None:
                yield response
            await reader
        finally:
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await reader

    async def GetModelInfo(self, request: pb.GetModelInfoRequest, context: Context) -> pb.ModelInfo:
        return await _guarded(context, self._model_info())

    # ---- helpers --------------------------------------------------------------------------

    async def _segment(
        self, request_id: str, image: bytes, options: pb.SegmentOptions, deadline: float | None
    ) -> pb.SegmentResponse:
        result = await self.pipeline.segment(image, converters.options_from_proto(options), deadline)
        t = result.timing
        stages = {
            "preprocess": t.preprocess_ms,
            "queue": t.queue_ms,
            "inference": t.inference_ms,
            "postprocess": t.postprocess_ms,
        }
        note_image(ImageNote(request_id, result.width, result.height, t.batch_size, "OK", stages))
        return converters.result_to_proto(request_id, result)

    async def _upload(self, chunks: AsyncIterator[pb.ImageChunk], deadline: float | None) -> pb.SegmentResponse:
        limit = self.pipeline.limits.max_bytes
        first: pb.ImageChunk | None = None
        parts: list[bytes] = []
        total = 0
        async for chunk in chunks:
            if first is None:
                first = chunk
            elif chunk.id or chunk.HasField("options"):
                raise InvalidOptions("id and options belong on the first chunk only")
            total += len(chunk.data)
            if total > limit:
                # Refuse now, without reading (and buffering) the rest of the upload.
                raise ImageTooLarge(f"upload passed {limit} bytes, the image size limit")
            parts.append(chunk.data)
        if first is None:
            raise InvalidImage("upload had no chunks")
        return await self._segment(first.id, b"".join(parts), first.options, deadline)

    async def _model_info(self) -> pb.ModelInfo:
        pipeline = self.pipeline
        s = pipeline.settings
        runtime = pipeline.runtime
        return pb.ModelInfo(
            model=s.model,
            weights=runtime.facts.weights_description if runtime else "loading",
            device=runtime.device_name if runtime else "loading",
            max_size=s.max_size,
            max_batch_size=s.max_batch_size,
            labels=converters.labels_to_proto(pipeline.labels) if runtime else [],
            weights_are_trained=bool(runtime and runtime.facts.weights_trained),
            batch_sizes=pipeline.batch_size_counts,
            max_batch_delay_ms=s.max_batch_delay_ms,
            max_queue=s.max_queue,
            runtime=runtime.description if runtime else "loading",
        )
