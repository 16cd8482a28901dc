"""The Segmenter servicer: thin. Each call parses its messages (segmenter_converters), makes one call of the
data plane (server/dataplane/), serialises the answer; errors become statuses in server.grpc.calls."""

from __future__ import annotations

from collections.abc import AsyncIterator

from protos.segserve.v1 import segserve_pb2 as pb
from protos.segserve.v1 import segserve_pb2_grpc as pb_grpc
from server.dataplane import DataPlane, UploadChunk
from server.grpc import segmenter_converters as converters
from server.grpc.calls import at_once, call_deadline, guarded, guarded_stream, read_message
from server.grpc.interceptor import Context


class SegmenterServicer(pb_grpc.SegmenterServicer):
    def __init__(self, plane: DataPlane) -> None:
        self.plane = plane

    async def Segment(self, request: pb.SegmentRequest, context: Context) -> pb.SegmentResponse:
        options = converters.options_from_proto(request.options)
        call = self.plane.segment(request.id, request.image, options, call_deadline(context))
        return converters.result_to_proto(request.id, await guarded(context, call))

    async def SegmentUpload(
        self, request_iterator: AsyncIterator[pb.ImageChunk], context: Context
    ) -> pb.SegmentResponse:
        async def next_chunk() -> UploadChunk | None:
            message: pb.ImageChunk | None = await read_message(context)
            return None if message is None else converters.chunk_from_proto(message)

        request_id, result = await guarded(context, self.plane.segment_upload(next_chunk, call_deadline(context)))
        return converters.result_to_proto(request_id, result)

    async def SegmentStream(
        self, request_iterator: AsyncIterator[pb.SegmentRequest], context: Context
    ) -> AsyncIterator[pb.SegmentResponse]:
        deadline = call_deadline(context)
        answers: AsyncIterator[pb.SegmentResponse] = guarded_stream(
            context,
            lambda: self.plane.segment_stream(lambda: read_message(context), converters.SEGMENT_STREAM, deadline),
        )
        async for answer in answers:
            yield answer

    async def GetModelInfo(self, request: pb.GetModelInfoRequest, context: Context) -> pb.ModelInfo:
        return converters.model_info_to_proto(await guarded(context, at_once(self.plane.model_info, request.model)))

    async def ListModels(self, request: pb.ListModelsRequest, context: Context) -> pb.ListModelsResponse:
        return converters.model_entries_to_proto(self.plane.list_models())
