"""The load worker: the one thread that runs model loads made at run time (weights, graph export, auto's building
and timing of every candidate runtime, warm-up), off the request path and at a lower CPU priority.

Off the request path: before it, a run-time load ran on the decode/encode pool every request shares, so while a
cold load exported and measured (minutes on a small CPU) it held one of that pool's threads, and requests queued
behind it. Here it has a thread of its own, and the pool is the requests' alone.

Lower priority: on Linux a thread's nice value is its own, and threads it starts inherit it. Each load job runs
at nice LOAD_NICE (CFS weight 110 against 1024 at nice 0: when serving wants both cores, the load gets about a
tenth of one), and so do the threads it starts (onnxruntime's and OpenMP's pools). Those threads outlive the load
when they belong to the runtime that now serves, so the job gives them back nice 0 at its end. Raising a
priority back needs CAP_SYS_NICE or an RLIMIT_NICE that allows it; where neither is there, loads run at normal
priority on their own thread rather than leave a served model's threads behind the others for good.
SCHED_IDLE was left out: its weight of 3 would starve a load for as long as serving keeps the cores busy.
"""

from __future__ import annotations

import logging
import os
import resource
import sys
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from functools import partial
from typing import Any, TypeVar

from server.core.thread_names import MODEL_LOAD, naming

log = logging.getLogger(__name__)

T = TypeVar("T")

LOAD_NICE = 10
CAP_SYS_NICE = 23


def thread_ids() -> set[int]:
    try:
        return {int(name) for name in os.listdir("/proc/self/task")}
    except OSError:
        return set()


def _has_cap_sys_nice() -> bool:
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("CapEff:"):
                    return bool(int(line.split()[1], 16) >> CAP_SYS_NICE & 1)
    except (OSError, ValueError):
        pass
    return False


def can_restore_priority() -> bool:
    """Whether this process may give a thread nice 0 back once it has lowered it (Linux only)."""
    if sys.platform != "linux":
        return False
    soft, _ = resource.getrlimit(resource.RLIMIT_NICE)
    return soft == resource.RLIM_INFINITY or soft >= 20 or _has_cap_sys_nice()


def nice_of(tid: int) -> int | None:
    try:
        return os.getpriority(os.PRIO_PROCESS, tid)
    except OSError:
        return None


class LoadWorker(ThreadPoolExecutor):
    """One thread; every job on it runs at nice LOAD_NICE where the priority can be restored, with the threads it
    started given nice 0 back at its end."""

    def __init__(self, nice: int = LOAD_NICE) -> None:
        super().__init__(max_workers=1, thread_name_prefix="model-load", initializer=naming(MODEL_LOAD))
        self.nice = nice if nice and can_restore_priority() else 0
        if nice and not self.nice:
            log.info("model loads run at normal priority: lowering it needs CAP_SYS_NICE to restore it after")

    def submit(self, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> Future[T]:
        return super().submit(self._lowered, partial(fn, *args, **kwargs))

    def _lowered(self, job: Callable[[], T]) -> T:
        if not self.nice:
            return job()
        me = threading.get_native_id()
        before = thread_ids()
        os.setpriority(os.PRIO_PROCESS, me, self.nice)
        try:
            return job()
        finally:
            for tid in (thread_ids() - before) | {me}:
                if nice_of(tid) == self.nice:
                    try:
                        os.setpriority(os.PRIO_PROCESS, tid, 0)
                    except OSError as exc:  # the thread ended meanwhile, or the permission went away
                        log.debug("could not restore the priority of thread %d: %s", tid, exc)
