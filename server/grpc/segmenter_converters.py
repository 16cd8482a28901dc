"""Protobuf messages <-> the data plane's values. The only module that knows both."""

from __future__ import annotations

import grpc

from protos.segserve.v1 import segserve_pb2 as pb
from server.core.types import SegmentOptions, SegmentResult
from server.dataplane import ModelEntry, ModelInfo, SegmentCall, UploadChunk
from server.errors import SegservError
from server.labels import Label


def options_from_proto(message: pb.SegmentOptions) -> SegmentOptions:
    return SegmentOptions(
        max_size=message.max_size,
        overlay=message.overlay,
        overlay_opacity=message.overlay_opacity if message.HasField("overlay_opacity") else None,
        model=message.model,
    )


def chunk_from_proto(message: pb.ImageChunk) -> UploadChunk:
    """The chunk's bytes are read once (each read of a bytes field is a fresh copy)."""
    options = options_from_proto(message.options) if message.HasField("options") else None
    return UploadChunk(message.data, message.id, options)


def result_to_proto(request_id: str, result: SegmentResult) -> pb.SegmentResponse:
    t = result.timing
    return pb.SegmentResponse(
        id=request_id,
        width=result.width,
        height=result.height,
        model_width=result.model_width,
        model_height=result.model_height,
        model=result.model,
        mask_png=result.mask_png,
        overlay_png=result.overlay_png or b"",
        classes=[pb.ClassFraction(index=c.index, name=c.name, fraction=c.fraction) for c in result.classes],
        timing=pb.Timing(
            queue_ms=t.queue_ms,
            inference_ms=t.inference_ms,
            batch_size=t.batch_size,
            preprocess_ms=t.preprocess_ms,
            postprocess_ms=t.postprocess_ms,
            total_ms=t.total_ms,
        ),
    )


def error_to_proto(request_id: str, error: SegservError) -> pb.SegmentResponse:
    code: grpc.StatusCode = error.code
    return pb.SegmentResponse(id=request_id, error=pb.Error(code=code.value[0], message=error.message))


class SegmentStreamCodec:
    """SegmentStream's messages for the data plane's stream engine."""

    @staticmethod
    def size(message: pb.SegmentRequest) -> int:
        return message.ByteSize()

    @staticmethod
    def request_id(message: pb.SegmentRequest) -> str:
        return message.id

    @staticmethod
    def parse(message: pb.SegmentRequest) -> SegmentCall:
        return SegmentCall(message.id, message.image, options_from_proto(message.options))

    @staticmethod
    def answer(request_id: str, result: SegmentResult) -> pb.SegmentResponse:
        return result_to_proto(request_id, result)

    @staticmethod
    def error(request_id: str, error: SegservError) -> pb.SegmentResponse:
        return error_to_proto(request_id, error)

    @staticmethod
    def answer_size(answer: pb.SegmentResponse) -> int:
        return answer.ByteSize()


SEGMENT_STREAM = SegmentStreamCodec()


def model_info_to_proto(info: ModelInfo) -> pb.ModelInfo:
    return pb.ModelInfo(
        model=info.model,
        name=info.name,
        is_default=info.is_default,
        weights=info.weights,
        device=info.device,
        runtime=info.runtime,
        max_size=info.max_size,
        max_batch_size=info.max_batch_size,
        max_batch_delay_ms=info.max_batch_delay_ms,
        max_queue=info.max_queue,
        batch_sizes=info.batch_sizes,
        labels=labels_to_proto(info.labels),
        weights_are_trained=info.weights_are_trained,
        resident_bytes=info.resident_bytes,
    )


def labels_to_proto(labels: tuple[Label, ...]) -> list[pb.Label]:
    return [pb.Label(index=label.index, name=label.name, color=label.hex_color) for label in labels]


def model_entries_to_proto(entries: list[ModelEntry]) -> pb.ListModelsResponse:
    return pb.ListModelsResponse(
        models=[
            pb.ModelStatus(
                name=e.name,
                architecture=e.architecture,
                state=e.state,
                reason=e.reason,
                is_default=e.is_default,
                default_reason=e.default_reason,
            )
            for e in entries
        ]
    )
