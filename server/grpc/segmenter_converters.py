"""Protobuf messages <-> the pipeline's domain objects. The only module that knows both."""

from __future__ import annotations

from protos.segserve.v1 import segserve_pb2 as pb
from server.core.types import SegmentOptions, SegmentResult
from server.errors import SegservError
from server.labels import Label
from server.models.registry import ModelEntry


def options_from_proto(message: pb.SegmentOptions) -> SegmentOptions:
    return SegmentOptions(
        max_size=message.max_size,
        overlay=message.overlay,
        overlay_opacity=message.overlay_opacity if message.HasField("overlay_opacity") else None,
        model=message.model,
    )


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
    return pb.SegmentResponse(id=request_id, error=pb.Error(code=error.code.value[0], message=error.message))


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
