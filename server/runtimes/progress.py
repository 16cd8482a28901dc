"""What a model's load is doing right now (loading weights, exporting a graph, measuring runtimes), for the one
who waits for it: the registry lists it as the reason of a model LOADING, and `python -m client load` prints it.

A load runs on one thread from start to end (the model pipeline's load worker), so the listener is kept per
thread: create_runtime and auto's measurement report phases without being handed anything, and a load on
another thread (or none at all) never sees them.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager

_local = threading.local()


@contextmanager
def reporting_to(listener: Callable[[str], None]) -> Iterator[None]:
    """Phases reported on this thread inside the block go to `listener`."""
    previous = getattr(_local, "listener", None)
    _local.listener = listener
    try:
        yield
    finally:
        _local.listener = previous


def report(phase: str) -> None:
    """A new phase of the load running on this thread ("exporting the onnxruntime graph"); nothing without one."""
    listener: Callable[[str], None] | None = getattr(_local, "listener", None)
    if listener is not None:
        listener(phase)
