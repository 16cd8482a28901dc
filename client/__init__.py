"""segserve client: a library (sync and asyncio) and a CLI (`python -m client`)."""

from client.aio import AsyncSegmentClient
from client.errors import SegmentError
from client.results import ClassShare, SegmentationResult, Timing
from client.sync import SegmentClient

__all__ = [
    "AsyncSegmentClient",
    "ClassShare",
    "SegmentClient",
    "SegmentError",
    "SegmentationResult",
    "Timing",
]
