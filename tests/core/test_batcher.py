from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable

import pytest

from server.core.batcher import Batcher
from server.errors import RequestExpired
from tests.helpers.batches import Recorder, shape

# A delay no test could sit out: a batch that waited for it would end the test at NEVER's timeout instead.
AN_HOUR_S = 3600.0
NEVER_S = 120.0


async def test_lone_request_does_not_wait_for_the_delay() -> None:
    model = Recorder()
    batcher = Batcher(model, shape, max_batch_size=8, max_delay_s=AN_HOUR_S)
    result = await asyncio.wait_for(batcher.submit(("a", 1)), NEVER_S)
    assert result.output == 2 and result.batch_size == 1
    await batcher.close()


async def test_flushes_when_full_without_waiting_for_the_delay() -> None:
    model = Recorder()
    batcher = Batcher(model, shape, max_batch_size=4, max_delay_s=AN_HOUR_S)
    with batcher.expecting():  # one more "on its way" keeps the batcher waiting unless the batch fills
        results = await asyncio.wait_for(asyncio.gather(*(batcher.submit(("a", i)) for i in range(4))), NEVER_S)
    assert [r.output for r in results] == [0, 2, 4, 6]
    assert [len(b) for b in model.batches] == [4]
    await batcher.close()


async def test_flushes_after_the_delay_while_more_are_expected() -> None:
    model = Recorder()
    batcher = Batcher(model, shape, max_batch_size=8, max_delay_s=0.05)
    with batcher.expecting():  # held open until the batch is back: only the delay can have sent it
        started = time.monotonic()
        results = await asyncio.wait_for(asyncio.gather(batcher.submit(("a", 1)), batcher.submit(("a", 2))), NEVER_S)
        waited = time.monotonic() - started
    assert [r.batch_size for r in results] == [2, 2]
    assert waited >= 0.04  # it did wait for the delay (a lower bound: a slow machine only makes it longer)
    await batcher.close()


async def test_only_same_shapes_share_a_batch() -> None:
    model = Recorder()
    model.gate.clear()  # hold the model so that everything queues up behind the first batch
    batcher = Batcher(model, shape, max_batch_size=8, max_delay_s=0.0)
    first = asyncio.ensure_future(batcher.submit(("a", 0)))
    await asyncio.sleep(0.05)
    rest = [asyncio.ensure_future(batcher.submit((s, i))) for i, s in enumerate("abab", start=1)]
    await asyncio.sleep(0.05)
    model.gate.set()
    await asyncio.gather(first, *rest)
    assert [sorted(k for k, _ in batch) for batch in model.batches] == [["a"], ["a", "a"], ["b", "b"]]
    assert batcher.batch_size_counts[:2] == [1, 2]
    await batcher.close()


async def test_max_batch_size_is_respected() -> None:
    model = Recorder()
    model.gate.clear()
    batcher = Batcher(model, shape, max_batch_size=3, max_delay_s=0.0)
    futures = [asyncio.ensure_future(batcher.submit(("a", i))) for i in range(8)]
    await asyncio.sleep(0.05)
    model.gate.set()
    await asyncio.gather(*futures)
    assert max(len(b) for b in model.batches) == 3
    assert sum(len(b) for b in model.batches) == 8
    await batcher.close()


async def test_an_error_reaches_every_waiter_and_the_batcher_keeps_going() -> None:
    model = Recorder(fail=True)
    model.gate.clear()
    batcher = Batcher(model, shape, max_batch_size=8, max_delay_s=0.0)
    futures = [asyncio.ensure_future(batcher.submit(("a", i))) for i in range(3)]
    await asyncio.sleep(0.05)
    model.gate.set()
    outcomes = await asyncio.gather(*futures, return_exceptions=True)
    assert all(isinstance(o, ValueError) for o in outcomes), outcomes
    model.fail = False
    assert (await batcher.submit(("a", 5))).output == 10
    await batcher.close()


async def test_expired_and_cancelled_requests_never_reach_the_model() -> None:
    model = Recorder()
    model.gate.clear()
    batcher = Batcher(model, shape, max_batch_size=8, max_delay_s=0.0)
    blocker = asyncio.ensure_future(batcher.submit(("a", 0)))
    await asyncio.sleep(0.05)
    expired = asyncio.ensure_future(batcher.submit(("a", 1), deadline=time.monotonic() + 0.01))
    cancelled = asyncio.ensure_future(batcher.submit(("a", 2)))
    alive = asyncio.ensure_future(batcher.submit(("a", 3)))
    await asyncio.sleep(0.05)
    cancelled.cancel()
    await asyncio.sleep(0.01)
    model.gate.set()
    await blocker
    assert (await alive).output == 6
    with pytest.raises(RequestExpired):
        await expired
    with pytest.raises(asyncio.CancelledError):
        await cancelled
    served = [value for batch in model.batches for _, value in batch]
    assert sorted(served) == [0, 3]
    await batcher.close()


async def test_a_full_batch_of_another_shape_does_not_wait_behind_a_filling_group() -> None:
    model = Recorder()
    batcher = Batcher(model, shape, max_batch_size=4, max_delay_s=10.0)
    try:
        with batcher.expecting():  # more on its way: the lone "a" waits for company, up to its delay
            filling = asyncio.ensure_future(batcher.submit(("a", 0)))
            await asyncio.sleep(0.05)
            full = [asyncio.ensure_future(batcher.submit(("b", i))) for i in range(4)]
            done, _ = await asyncio.wait([filling, *full], return_when=asyncio.FIRST_COMPLETED)
            # The full "b" batch ran first; the "a" group, older but neither full nor overdue, still waits.
            assert not filling.done() and done == set(full)
            assert [[k for k, _ in batch] for batch in model.batches] == [["b"] * 4]
        assert (await filling).batch_size == 1  # nothing more on its way now: it goes at once
    finally:
        await batcher.close()


class Held:
    """A fake model that holds every batch until `gate` opens; it counts the batches inside it now and at most."""

    def __init__(self) -> None:
        self.gate = threading.Event()
        self.lock = threading.Lock()
        self.running = 0
        self.most = 0

    def __call__(self, items: list[int]) -> list[int]:
        with self.lock:
            self.running += 1
            self.most = max(self.most, self.running)
        assert self.gate.wait(NEVER_S), "the test never opened the gate"
        with self.lock:
            self.running -= 1
        return items


async def poll(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + NEVER_S
    while not condition():
        assert time.monotonic() < deadline, f"never saw {what}"
        await asyncio.sleep(0.01)


@pytest.mark.parametrize("instances", [1, 2, 3])
async def test_as_many_batches_run_at_once_as_there_are_instances_and_no_more(instances: int) -> None:
    model = Held()
    batcher = Batcher(model, lambda item: "a", max_batch_size=1, max_delay_s=0.0, instances=instances)
    calls = [asyncio.ensure_future(batcher.submit(i)) for i in range(6)]
    await poll(lambda: model.running == instances, f"{instances} batches in the model at once")
    for _ in range(20):  # the batcher's loop has had its turns: any batch it would start is started by now
        await asyncio.sleep(0)
    assert model.running == instances and batcher.queued == 6 - instances  # the rest wait in the queue
    model.gate.set()
    results = await asyncio.wait_for(asyncio.gather(*calls), NEVER_S)
    assert [r.output for r in results] == list(range(6))
    assert model.most == instances
    await batcher.close()
