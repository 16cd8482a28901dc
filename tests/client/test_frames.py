"""The video window's answers (client/frames.py): one per sent frame, anything else an error the caller sees.

A second answer for a frame is a bug of the resume (client/resume.py) or of the server; taken silently it
would hide that bug from every test that checks the frames it gets back, and sit in the window forever.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import grpc
import numpy as np
import pytest

from client import SegmentError
from client.frames import FrameWindow
from protos.segserve.v1 import segserve_pb2 as pb
from tests.client.standins import Replica, StandIn, start_replica

FRAME = np.zeros((3, 4, 3), dtype=np.uint8)
FRAMES = [np.full((3, 4, 3), n, dtype=np.uint8) for n in range(12)]


def answer(index: int | str) -> pb.SegmentResponse:
    return pb.SegmentResponse(id=str(index), width=4, height=3)


def window_holding(count: int, every: int = 1) -> FrameWindow:
    window = FrameWindow(size=count, every=every)
    for index in range(count):
        window.hold(index, FRAME)
    return window


def test_each_sent_frame_takes_one_answer_in_any_order() -> None:
    window = window_holding(3)
    for index in (2, 0, 1):
        window.answer(answer(index))
    assert [frame.index for frame in window.pop_ready()] == [0, 1, 2]
    window.check_complete()


@pytest.mark.parametrize("handed_back", [False, True])
def test_a_second_answer_for_a_frame_is_an_error(handed_back: bool) -> None:
    window = window_holding(2)
    window.answer(answer(0))
    if handed_back:
        assert [frame.index for frame in window.pop_ready()] == [0]
    with pytest.raises(SegmentError, match="a second answer for frame 0") as failed:
        window.answer(answer(0))
    assert failed.value.code == grpc.StatusCode.INTERNAL


@pytest.mark.parametrize("index", [5, -1, 1])
def test_an_answer_for_a_frame_not_sent_is_an_error(index: int) -> None:
    window = window_holding(3, every=2)  # frames 0 and 2 are sent; 1 is skipped, 5 and -1 never taken
    with pytest.raises(SegmentError, match=f"an answer for frame {index}, which was not sent"):
        window.answer(answer(index))


class AnswersTwice(StandIn):
    """Answers every request twice: the server-side bug the client must not swallow."""

    def SegmentStream(
        self, request_iterator: Iterator[pb.SegmentRequest], context: grpc.ServicerContext
    ) -> Iterator[pb.SegmentResponse]:
        for response in super().SegmentStream(request_iterator, context):
            yield response
            yield response


@pytest.fixture
def answers_twice() -> Iterator[Replica]:
    replica = start_replica(AnswersTwice("twice"))
    yield replica
    replica.stop()


def test_a_video_answered_twice_fails_in_both_clients(
    connect_client: Callable[..., Any], answers_twice: Replica
) -> None:
    with connect_client(answers_twice.target, timeout=30) as client, pytest.raises(SegmentError) as failed:
        list(client.segment_frames(FRAMES, window=4))
    assert failed.value.code == grpc.StatusCode.INTERNAL and "a second answer for frame 0" in failed.value.message
