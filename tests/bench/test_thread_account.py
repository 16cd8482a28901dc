"""The per-thread CPU account: a real server's threads carry the names the account groups them by."""

from __future__ import annotations

import os

from bench.thread_account import cpu_by_group, group_of, snapshot
from client import SegmentClient


def test_a_served_call_is_accounted_to_the_model_and_to_decoding(client: SegmentClient, jpeg_bytes: bytes) -> None:
    client.segment(jpeg_bytes)  # every pool has started its threads
    pid = os.getpid()  # the test server runs in this process
    before = snapshot(pid)
    for _ in range(40):
        client.segment(jpeg_bytes)
    spent = cpu_by_group(before, snapshot(pid), pid)
    names = {name for name, _ in before.values()}
    assert {"prepost", "model"} <= names
    # Counters tick every 10 ms; forty small calls are well above that in both groups.
    assert spent["inference"] > 0.05
    assert spent["decode/encode"] > 0
    # The model's time went to the threads named for it: the largest group. ("other" holds this test
    # server's event loop, a thread of pytest's process rather than the main thread of `python -m server`.)
    assert spent["inference"] > max(v for group, v in spent.items() if group != "inference")


def test_groups_by_name_and_the_main_thread_is_the_event_loop() -> None:
    assert group_of(100, "python", 100) == "event loop"
    assert group_of(101, "runtime", 100) == group_of(102, "model", 100) == "inference"
    assert group_of(103, "prepost", 100) == group_of(104, "overlay", 100) == "decode/encode"
    assert group_of(105, "event_engine", 100) == group_of(106, "grpc_global_tim", 100) == "gRPC core"
    assert group_of(107, "python", 100) == "other"
