"""The Segmenter servicer: thin. Messages in, pipeline call, messages out; errors become statuses here."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator

import grpc
from google.protobuf.message import DecodeError

from protos.segserve.v1 import segserve_pb2 as pb
from protos.segserve.v1 import segserve_pb2_grpc as pb_grpc
from server.core.admission import AdmissionSlot
from server.core.allocator import give_back_freed_memory
from server.core.buffers import UploadHold
from server.core.model_pipeline import ModelPipeline
from server.core.pipeline import SegmentationPipeline
from server.core.stream_window import STREAM_WINDOW, Place, StreamWindow
from server.core.types import SegmentOptions
from server.errors import ImageTooLarge, InvalidImage, InvalidOptions, SegservError, UploadStalled
from server.grpc import segmenter_converters as converters
from server.grpc.calls import call_deadline, guarded, read_message, refuse_new_call
from server.grpc.interceptor import Context
from server.operations.access import ImageNote, note_image, note_result

log = logging.getLogger(__name__)


class SegmenterServicer(pb_grpc.SegmenterServicer):
    def __init__(self, pipeline: SegmentationPipeline) -> None:
        self.pipeline = pipeline

    async def Segment(self, request: pb.SegmentRequest, context: Context) -> pb.SegmentResponse:
        return await guarded(
            context,
            self._segment(
                request.id, request.image, converters.options_from_proto(request.options), call_deadline(context)
            ),
        )

    async def SegmentUpload(
        self, request_iterator: AsyncIterator[pb.ImageChunk], context: Context
    ) -> pb.SegmentResponse:
        try:
            return await guarded(context, self._upload(context, call_deadline(context)))
        finally:
            give_back_freed_memory()  # the upload's chunks and joined image are gone by now

    async def SegmentStream(
        self, request_iterator: AsyncIterator[pb.SegmentRequest], context: Context
    ) -> AsyncIterator[pb.SegmentResponse]:
        pipeline = self.pipeline
        deadline = call_deadline(context)
        if pipeline.draining:  # refused whole, before any answer, so the client retries it on another replica
            await guarded(context, refuse_new_call(pipeline))
        # Never more than the queue admits, so a lone stream is never refused for its own items.
        window: StreamWindow[pb.SegmentResponse] = StreamWindow(
            min(STREAM_WINDOW, pipeline.settings.max_queue), pipeline.streams, pipeline.stream_bytes.stream()
        )
        items: set[asyncio.Task[None]] = set()

        async def one(
            place: Place[pb.SegmentResponse], request: pb.SegmentRequest, refusal: SegservError | None
        ) -> None:
            try:
                if refusal is not None:
                    raise refusal
                # A stream that was open when the drain began is an admitted call: it is served to its end.
                place.admission = pipeline.admit(admitted_before_drain=True)
                response = await self._segment(
                    request.id, request.image, converters.options_from_proto(request.options), deadline, place.admission
                )
            except SegservError as exc:
                note_image(ImageNote(request.id, code=exc.code.name))
                response = converters.error_to_proto(request.id, exc)
            except Exception:
                log.exception("unexpected error in stream item %r", request.id)
                note_image(ImageNote(request.id, code=grpc.StatusCode.INTERNAL.name))
                response = pb.SegmentResponse(
                    id=request.id, error=pb.Error(code=grpc.StatusCode.INTERNAL.value[0], message="internal error")
                )
            window.deliver(place, response, window.bytes.response_made(response.ByteSize()))

        async def read_all() -> None:
            error: BaseException | None = None
            try:
                while True:
                    place = await window.place()  # before reading: a full window leaves requests unread
                    request = await read_message(context)
                    if request is None:
                        place.release()
                        break
                    refusal = window.bytes.refusal()
                    if refusal is None:
                        place.count(window.bytes.in_progress(request.ByteSize()))
                    item = asyncio.create_task(one(place, request, refusal))
                    items.add(item)
                    item.add_done_callback(items.discard)
            except Exception as exc:
                error = exc
            finally:
                # Whatever stopped the reading, the images already read are answered, then the stream ends.
                if items:
                    await asyncio.wait(set(items))
                window.end(error)

        pipeline.streams.open_streams += 1
        reader = asyncio.create_task(read_all())
        try:
            while (place := await window.next_ready()) is not None:
                assert place.response is not None
                yield place.response
                place.release()  # resumed only once the write has completed (ObservingInterceptor)
            await reader
            if window.error is not None:
                await self._abort_for_request_side(context, window.error)
        finally:
            for task in (reader, *items):
                task.cancel()
            try:
                await asyncio.gather(reader, *items, return_exceptions=True)
            finally:
                # Even when this wait is cancelled too (gRPC may cancel a finished call's task again),
                # every place the stream holds goes back, or the queue would shrink for good.
                window.close()
                pipeline.streams.open_streams -= 1

    async def GetModelInfo(self, request: pb.GetModelInfoRequest, context: Context) -> pb.ModelInfo:
        return await guarded(context, self._model_info(request.model))

    async def ListModels(self, request: pb.ListModelsRequest, context: Context) -> pb.ListModelsResponse:
        return converters.model_entries_to_proto(self.pipeline.models.entries())

    # ---- helpers --------------------------------------------------------------------------

    @staticmethod
    async def _abort_for_request_side(context: Context, error: BaseException) -> None:
        if isinstance(error, DecodeError):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"a stream request could not be parsed: {error}")
        log.error("stream request side failed", exc_info=error)
        await context.abort(grpc.StatusCode.INTERNAL, "internal error reading the stream; see the server log")

    async def _segment(
        self,
        request_id: str,
        image: bytes,
        options: SegmentOptions,
        deadline: float | None,
        slot: AdmissionSlot | None = None,
        model: ModelPipeline | None = None,
    ) -> pb.SegmentResponse:
        result = await self.pipeline.segment(image, options, deadline, slot, model)
        note_result(request_id, result)
        return converters.result_to_proto(request_id, result)

    async def _upload(self, context: Context, deadline: float | None) -> pb.SegmentResponse:
        pipeline = self.pipeline
        # Asked before the first chunk is even read: a refused caller's bytes are never copied into Python.
        with pipeline.admit() as slot, pipeline.uploads.hold() as hold:
            hold.check_room()
            first = await self._next_chunk(context)
            if first is None:
                raise InvalidImage("upload had no chunks")
            image_id, options = first.id, converters.options_from_proto(first.options)
            # Held from the first chunk: an unload of this model waits for the upload rather than refuse it late.
            with pipeline.models.acquire(options.model) as model:
                model.check_options(options)
                image = await self._receive_upload(first, context, hold)
                del first
                return await self._segment(image_id, image, options, deadline, slot, model)

    async def _receive_upload(self, first: pb.ImageChunk, context: Context, hold: UploadHold) -> bytes:
        limit = self.pipeline.limits.max_bytes
        # Kept as the chunks came and joined once at the end. A BytesIO grown chunk by chunk avoids that
        # final copy, but its reallocations fragment the heap: in issue 11's scenario of 48 slow uploads,
        # RSS grew +466 MiB with it against +359 MiB this way.
        received: list[bytes] = []
        size = 0
        chunk: pb.ImageChunk | None = first
        try:
            while chunk is not None:
                if chunk is not first and (chunk.id or chunk.HasField("options")):
                    raise InvalidOptions("id and options belong on the first chunk only")
                data = chunk.data  # each read of a bytes field is a fresh copy: once only
                chunk = None
                if size + len(data) > limit:
                    # Refuse now, without reading (and buffering) the rest of the upload.
                    raise ImageTooLarge(f"upload passed {limit} bytes, the image size limit")
                hold.add(len(data))
                received.append(data)
                size += len(data)
                del data
                chunk = await self._next_chunk(context)
            return b"".join(received)
        finally:
            received.clear()  # not left to whoever keeps this frame alive (a refusal's traceback)

    async def _next_chunk(self, context: Context) -> pb.ImageChunk | None:
        idle = self.pipeline.settings.upload_idle_timeout_s
        try:
            chunk: pb.ImageChunk | None = await asyncio.wait_for(read_message(context), idle)
            return chunk
        except TimeoutError:
            raise UploadStalled(
                f"upload stalled: no chunk for {idle:g} s (SEGSERVE_UPLOAD_IDLE_TIMEOUT_S); its bytes were freed"
            ) from None

    async def _model_info(self, name: str) -> pb.ModelInfo:
        pipeline = self.pipeline
        if not pipeline.ready and not name:  # still starting: the default model's settings, "loading"
            s = pipeline.settings
            return pb.ModelInfo(
                model=s.model,
                weights="loading",
                device="loading",
                runtime="loading",
                max_size=s.max_size,
                max_batch_size=s.max_batch_size,
                max_batch_delay_ms=s.max_batch_delay_ms,
                max_queue=s.max_queue,
                batch_sizes=pipeline.batch_size_counts,
            )
        model = pipeline.models.get(name)
        s = model.settings
        runtime = model.runtime
        return pb.ModelInfo(
            model=model.config.architecture,
            name=model.name,
            is_default=model.name == pipeline.models.default_name,
            weights=runtime.facts.weights_description if runtime else "loading",
            device=runtime.device_name if runtime else "loading",
            max_size=s.max_size,
            max_batch_size=s.max_batch_size,
            labels=converters.labels_to_proto(model.labels),
            weights_are_trained=bool(runtime and runtime.facts.weights_trained),
            batch_sizes=model.batch_size_counts,
            max_batch_delay_ms=s.max_batch_delay_ms,
            max_queue=pipeline.settings.max_queue,
            runtime=runtime.description if runtime else "loading",
            resident_bytes=model.resident_bytes,
        )
