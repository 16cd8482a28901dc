"""`python -m bench.memory_probe SERVER_ARGS...`: `python -m server` that, on SIGUSR1, appends one JSON line
to $SEGSERVE_PROBE_PATH: RSS, glibc's mallinfo2() (bytes in use, and free but kept in its arenas), and,
from the second signal on, the Python heap traced since the first (tracemalloc) with its top sites.

Tracing starts at the first signal, not at start-up: under tracemalloc, importing torch and loading the
model take minutes. Protobuf messages (upb) are allocated outside Python's allocator, so tracemalloc does
not see them; mallinfo2 does. Used by bench.stalled_stream (docs/operations.md, issue 21).
"""

from __future__ import annotations

import ctypes
import json
import os
import signal
import sys
import threading
import tracemalloc
from types import FrameType
from typing import Any

MALLINFO2_FIELDS = ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks")


class Mallinfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (*MALLINFO2_FIELDS, "keepcost")]


def process_status() -> dict[str, int]:
    with open("/proc/self/status") as status:
        return {
            line.split(":")[0]: int(line.split()[1]) * 1024
            for line in status
            if line.startswith(("VmRSS", "RssAnon", "RssFile"))
        }


def probe() -> dict[str, Any]:
    libc = ctypes.CDLL("libc.so.6")
    libc.mallinfo2.restype = Mallinfo2
    info = libc.mallinfo2()
    facts: dict[str, Any] = {
        "malloc_in_use": info.uordblks + info.hblkhd,
        "malloc_free_kept": info.fordblks,
        "malloc_arenas": info.arena,
        "threads": threading.active_count(),
        **process_status(),
    }
    if not tracemalloc.is_tracing():
        tracemalloc.start(8)
        return facts
    facts["python_traced"], facts["python_traced_peak"] = tracemalloc.get_traced_memory()
    top = tracemalloc.take_snapshot().statistics("traceback")[:8]
    facts["python_top"] = [(stat.traceback.format()[-1].strip(), stat.size) for stat in top]
    return facts


def on_signal(signum: int, frame: FrameType | None) -> None:
    with open(os.environ["SEGSERVE_PROBE_PATH"], "a") as out:
        out.write(json.dumps(probe()) + "\n")


def main() -> int:
    from server.__main__ import main as serve

    signal.signal(signal.SIGUSR1, on_signal)
    return serve(sys.argv[1:])


if __name__ == "__main__":
    sys.exit(main())
