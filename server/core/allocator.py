"""Giving freed memory back to the system after large frees (glibc only).

glibc keeps what Python frees in its arenas for reuse, and raises its mmap threshold after a large free,
so the megabyte chunks of later uploads come from the arenas too, and what an upload held stays resident
after it ends. malloc_trim(0) returns the free pages of every arena, not only the top of the heap, so RSS at
rest after the hostile scenario is lower with it (docs/operations.md, 'Where a stalled stream's memory
went'). It takes well under a millisecond, and is rate-limited here so a flood of refused
uploads does not call it thousands of times a second.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import time
from collections.abc import Callable

MIN_INTERVAL_S = 0.25


def _malloc_trim() -> Callable[[int], int] | None:
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        trim = libc.malloc_trim
    except (OSError, AttributeError, TypeError):
        return None  # not glibc (musl): nothing to call
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    return trim


_TRIM = _malloc_trim()
_last = 0.0


def give_back_freed_memory(*, force: bool = False) -> None:
    """After a call that held megabytes has let them go. At most every MIN_INTERVAL_S, unless `force`."""
    global _last
    now = time.monotonic()
    if _TRIM is None or (not force and now - _last < MIN_INTERVAL_S):
        return
    _last = now
    _TRIM(0)
