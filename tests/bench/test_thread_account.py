"""The per-thread CPU account: a real server's threads carry the names the account groups them by."""

from __future__ import annotations

import os

from bench.thread_account import cpu_by_group, group_of, snapshot
from client import SegmentClient

TICK_S = 1 / os.sysconf("SC_CLK_TCK")
"""The counters' step (10 ms where CLK_TCK is 100): a group's figure is a whole number of ticks per thread."""
MODEL_TICKS, DECODE_TICKS = 20, 5
"""Enough ticks that a tick more or less, per thread, cannot decide the comparisons below."""
MAX_CALLS = 3000
"""The bound on the calls: 60 reached both counts on the 2-core dev machine (2026-12-05, 3.5 ms of model CPU a
call), so a CPU many times faster still gets there; a thread left unnamed keeps its group at 0 and the loop ends
here (3000 calls took 15 s there)."""


def test_a_served_call_is_accounted_to_the_model_and_to_decoding(client: SegmentClient, jpeg_bytes: bytes) -> None:
    client.segment(jpeg_bytes)  # every pool has started its threads
    pid = os.getpid()  # the test server runs in this process
    before = snapshot(pid)
    # Calls go on until both groups have ticked enough, however fast this CPU is: the work scales with what is
    # measured, rather than a fixed number of calls whose CPU time depends on the machine.
    calls, spent = 0, cpu_by_group(before, before, pid)
    while calls < MAX_CALLS and (
        spent["inference"] < MODEL_TICKS * TICK_S or spent["decode/encode"] < DECODE_TICKS * TICK_S
    ):
        for _ in range(5):  # a snapshot every few calls keeps the reading's own CPU (this thread's) small
            client.segment(jpeg_bytes)
        calls += 5
        spent = cpu_by_group(before, snapshot(pid), pid)
    names = {name for name, _ in before.values()}
    assert {"prepost", "model"} <= names
    assert spent["inference"] >= MODEL_TICKS * TICK_S, f"{calls} calls: {spent}"
    assert spent["decode/encode"] >= DECODE_TICKS * TICK_S, f"{calls} calls: {spent}"
    # The model's time went to the threads named for it: the largest group. ("other" holds this test
    # server's event loop, a thread of pytest's process rather than the main thread of `python -m server`.)
    assert spent["inference"] > max(v for group, v in spent.items() if group != "inference"), f"{calls} calls: {spent}"


def test_groups_by_name_and_the_main_thread_is_the_event_loop() -> None:
    assert group_of(100, "python", 100) == "event loop"
    assert group_of(101, "runtime", 100) == group_of(102, "model", 100) == "inference"
    assert group_of(103, "prepost", 100) == group_of(104, "overlay", 100) == "decode/encode"
    assert group_of(105, "event_engine", 100) == group_of(106, "grpc_global_tim", 100) == "gRPC core"
    assert group_of(107, "python", 100) == "other"
