"""The data plane (shared/design.md, "one data plane under thin doors"): DataPlane is the one API the doors
call; the values it takes and returns are re-exported here, so a door imports this package, the value types of
server.core.types and server.inference, and its own converters, and nothing else of the server's machinery
(`make lint`'s import contract says so)."""

from server.dataplane.plane import DataPlane, StreamCodec
from server.dataplane.types import (
    ByteHold,
    IndexEntry,
    ModelInfo,
    SegmentCall,
    StatisticDuration,
    StatisticsReport,
    UploadChunk,
)
from server.models.registry import ModelEntry, ModelState

__all__ = [
    "ByteHold",
    "DataPlane",
    "IndexEntry",
    "ModelEntry",
    "ModelInfo",
    "ModelState",
    "SegmentCall",
    "StatisticDuration",
    "StatisticsReport",
    "StreamCodec",
    "UploadChunk",
]
