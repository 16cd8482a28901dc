"""segserve client: a library (sync and asyncio) and a CLI (`python -m client`)."""

from client.aio import AsyncSegmentClient
from client.errors import SegmentError
from client.results import ClassShare, SegmentationResult, Timing
from client.security import tls_credentials
from client.sync import SegmentClient

__all__ = [
    "AsyncSegmentClient",
    "ClassShare",
    "SegmentClient",
    "SegmentError",
    "SegmentationResult",
    "Timing",
    "tls_credentials",
]
