"""The two clients at parity: the same calls with the same parameters, the same waits, the same errors.

Tests that take `connect_client` run once with SegmentClient and once with AsyncSegmentClient; the rest
judge what both share (client/errors.py, client/resume.py) directly.
"""

from __future__ import annotations

import inspect
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import grpc
import numpy as np
import pytest

from client import AsyncSegmentClient, SegmentClient, SegmentError
from client.errors import LOST_STATUS_MESSAGE, segment_errors
from client.resume import resumable
from tests.client.standins import Replica, StandIn, start_replica

UNREACHABLE = "127.0.0.1:1"
# What grpc.aio reports when a request written as a stream ends replaces the stream's status (grpc/grpc#36066).
LOST = 'Failed "execute_batch": (<grpc._cython.cygrpc.SendMessageOperation object at 0x7f0000000000>,)'


def public_calls(cls: type) -> dict[str, inspect.Signature]:
    calls = {name: inspect.signature(f) for name, f in vars(cls).items() if callable(f) and not name.startswith("_")}
    calls["__init__"] = inspect.signature(cls.__init__)  # type: ignore[misc]
    return calls


def shape(signature: inspect.Signature) -> list[tuple[str, object, object]]:
    """Names, kinds and defaults: what a caller writes. Types differ where one awaits (grpc.aio.Channel)."""
    return [(p.name, p.kind, p.default) for p in signature.parameters.values()]


def test_the_async_client_has_every_call_of_the_sync_one_with_the_same_parameters() -> None:
    sync_calls, async_calls = public_calls(SegmentClient), public_calls(AsyncSegmentClient)
    # Each client's own way to be closed: `with` and `async with`.
    assert set(sync_calls) - {"__init__"} <= set(async_calls), set(sync_calls) - set(async_calls)
    for name, signature in sync_calls.items():
        assert shape(async_calls[name]) == shape(signature), name


@pytest.fixture
def not_serving() -> Iterator[Replica]:
    replica = start_replica(StandIn("loading"), serving=False)
    yield replica
    replica.stop()


def test_wait_until_serving_returns_once_the_server_says_serving(
    connect_client: Callable[..., Any], not_serving: Replica
) -> None:
    later = threading.Timer(0.8, not_serving.serving, args=(True,))
    with connect_client(not_serving.target) as client:
        assert client.health() == "NOT_SERVING"
        started = time.monotonic()
        later.start()
        try:
            client.wait_until_serving(timeout=20)
        finally:
            later.cancel()
        assert time.monotonic() - started >= 0.7
        assert client.health() == "SERVING"


@pytest.mark.parametrize(("where", "last"), [("not-serving", "(NOT_SERVING)"), ("unreachable", "UNAVAILABLE")])
def test_wait_until_serving_gives_up_after_its_timeout_with_the_last_answer(
    connect_client: Callable[..., Any], not_serving: Replica, where: str, last: str
) -> None:
    target = not_serving.target if where == "not-serving" else UNREACHABLE
    with connect_client(target) as client:
        started = time.monotonic()
        with pytest.raises(SegmentError) as gave_up:
            client.wait_until_serving(timeout=1.5)
        assert 1.4 <= time.monotonic() - started < 5
    assert gave_up.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
    assert f"server at {target} not serving after 2s" in gave_up.value.message and last in gave_up.value.message


def test_a_channel_of_the_callers_own_carries_the_calls_and_streams_resume_over_it(
    connect_client: Callable[..., Any],
) -> None:
    replica = start_replica(StandIn("flaky", lose_streams=1))
    try:
        with connect_client(replica.target, channel_extra=[("grpc.primary_user_agent", "parity-test/7")]) as client:
            ids = sorted(int(r.id) for r in client.segment_many([bytes([n]) for n in range(12)]))
    finally:
        replica.stop()
    assert ids == list(range(12))
    assert replica.servicer.streams == 2 and all(
        agent.startswith("parity-test/7 ") for agent in replica.servicer.user_agents
    )


@pytest.mark.parametrize(
    ("call", "args"),
    [
        ("segment", (b"\x89PNG",)),
        ("model_info", ()),
        ("list_models", ()),
        ("load_model", ("extra",)),
        ("unload_model", ("extra",)),
        ("segment_many", ([b"\x89PNG"],)),
        ("segment_frames", ([np.zeros((3, 4, 3), dtype=np.uint8)],)),
    ],
)
def test_a_call_that_fails_raises_segment_error_with_its_status(
    connect_client: Callable[..., Any], call: str, args: tuple[object, ...]
) -> None:
    keywords = {"image_id": "one"} if call == "segment" else {}

    def make_the_call(client: Any) -> None:
        outcome = getattr(client, call)(*args, **keywords)
        if call.startswith("segment_"):
            list(outcome)  # a stream's failure comes while it is read

    with connect_client(UNREACHABLE, timeout=5) as client, pytest.raises(SegmentError) as failed:
        make_the_call(client)
    assert failed.value.code == grpc.StatusCode.UNAVAILABLE, failed.value
    assert failed.value.__suppress_context__  # gRPC's own traceback left out
    assert failed.value.image_id == ("one" if call == "segment" else "")


def test_segment_errors_turns_both_apis_errors_into_segment_error() -> None:
    aio_error = grpc.aio.AioRpcError(grpc.StatusCode.NOT_FOUND, None, None, details="no model 'x'")
    with pytest.raises(SegmentError) as failed, segment_errors("photo.jpg"):
        raise aio_error
    assert (failed.value.code, failed.value.message, failed.value.image_id) == (
        grpc.StatusCode.NOT_FOUND,
        "no model 'x'",
        "photo.jpg",
    )
    with pytest.raises(SegmentError) as unknown, segment_errors():
        raise grpc.RpcError("raised by hand")
    assert unknown.value.code == grpc.StatusCode.UNKNOWN
    with pytest.raises(ValueError), segment_errors():  # nothing else is touched
        raise ValueError("not a call's")


def test_a_stream_whose_status_grpc_aio_lost_is_resumed_and_said_so_when_not() -> None:
    lost = grpc.aio.AioRpcError(grpc.StatusCode.INTERNAL, None, None, "Internal error from Core", LOST)
    server_internal = grpc.aio.AioRpcError(grpc.StatusCode.INTERNAL, None, None, "boom", "server said")
    unavailable = grpc.aio.AioRpcError(grpc.StatusCode.UNAVAILABLE, None, None, "Stream removed")
    cancelled = grpc.aio.AioRpcError(grpc.StatusCode.CANCELLED, None, None, "Locally cancelled")
    assert resumable(lost, 0, 3) and resumable(unavailable, 2, 3)
    assert not resumable(lost, 3, 3) and not resumable(server_internal, 0, 3) and not resumable(cancelled, 0, 3)
    assert LOST_STATUS_MESSAGE in SegmentError.from_rpc_error(lost).message
    assert SegmentError.from_rpc_error(server_internal).message == "boom"
