"""Where a server's CPU goes, by thread: Linux's per-thread counters (/proc/PID/task/*/stat) read before and
after a load step, grouped by the names the server gives its threads (server/core/thread_names.py).

Groups: inference (the model's threads and the runtime's own pools), decode/encode (the request pool and
the overlay thread), event loop (the main thread: gRPC's and HTTP's Python side, protobuf, the batcher),
gRPC core (its C threads), other (anything unnamed: Python's and libraries' helpers).
"""

from __future__ import annotations

import os
from pathlib import Path

GROUPS = ("inference", "decode/encode", "event loop", "gRPC core", "other")
_TICK_S = 1 / os.sysconf("SC_CLK_TCK")
_BY_NAME = {"model": "inference", "runtime": "inference", "prepost": "decode/encode", "overlay": "decode/encode"}
_GRPC_PREFIXES = ("grpc_", "event_engine", "lifeguard")

Snapshot = dict[int, tuple[str, float]]
"""Thread id -> (name, CPU seconds so far, user and system)."""


def snapshot(pid: int) -> Snapshot:
    threads: Snapshot = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            name = (task / "comm").read_text().strip()
            # The name may hold spaces and parentheses: the fields after its closing parenthesis are fixed.
            fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:  # the thread ended meanwhile
            continue
        threads[int(task.name)] = (name, (int(fields[11]) + int(fields[12])) * _TICK_S)
    return threads


def group_of(tid: int, name: str, pid: int) -> str:
    if tid == pid:
        return "event loop"
    if name.startswith(_GRPC_PREFIXES):
        return "gRPC core"
    return _BY_NAME.get(name, "other")


def cpu_by_group(before: Snapshot, after: Snapshot, pid: int) -> dict[str, float]:
    """CPU seconds each group spent between the snapshots (a thread born between them counts from zero)."""
    spent = dict.fromkeys(GROUPS, 0.0)
    for tid, (name, seconds) in after.items():
        spent[group_of(tid, name, pid)] += seconds - before.get(tid, (name, 0.0))[1]
    return spent


def process_cpu_s() -> float:
    """This process's CPU seconds so far, every thread (for the model alone, timed in-process)."""
    times = os.times()
    return times.user + times.system
