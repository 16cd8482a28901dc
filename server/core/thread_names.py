"""Operating-system names for the server's threads, so that `top -H`, py-spy and the bench's per-thread CPU
account tell the model's threads from decoding's and the event loop's.

Python's thread names stay inside Python; what /proc and every tool show is Linux's comm (15 bytes), which
Python 3.11 leaves as "python" for every thread. A thread inherits its creator's comm, so a runtime's own
pools (onnxruntime's intra-op threads, OpenVINO's TBB workers) get the name of the thread that built or
first ran them: the runtime is built under RUNTIME and runs on MODEL, and both count as inference.
Elsewhere than Linux this does nothing.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import sys
from collections.abc import Callable, Iterator

PREPOST = "prepost"
OVERLAY = "overlay"
MODEL = "model"
RUNTIME = "runtime"
MODEL_LOAD = "model-load"

_PR_SET_NAME, _PR_GET_NAME = 15, 16
_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True) if sys.platform == "linux" else None


def os_thread_name() -> str:
    if _libc is None:
        return ""
    buffer = ctypes.create_string_buffer(16)
    _libc.prctl(_PR_GET_NAME, buffer, 0, 0, 0)
    return buffer.value.decode(errors="replace")


def set_os_thread_name(name: str) -> None:
    if _libc is not None:
        _libc.prctl(_PR_SET_NAME, name.encode()[:15], 0, 0, 0)


def naming(name: str) -> Callable[[], None]:
    """A ThreadPoolExecutor initializer that names each of its threads `name`."""
    return lambda: set_os_thread_name(name)


@contextlib.contextmanager
def os_thread_named(name: str) -> Iterator[None]:
    """This thread is `name` for the block (threads started in it keep the name), then what it was."""
    before = os_thread_name()
    set_os_thread_name(name)
    try:
        yield
    finally:
        set_os_thread_name(before)
