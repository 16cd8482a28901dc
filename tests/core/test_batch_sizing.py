"""The adaptive batch-size rule, with costs fed in by hand: no clocks, no real model."""

from __future__ import annotations

import asyncio

from server.core.batch_sizing import BatchSizer
from server.core.batcher import Batcher
from tests.helpers.batches import Recorder, shape


def feed(sizer: BatchSizer, key: str, size: int, per_image_ms: float, times: int = 2) -> None:
    for _ in range(times):
        sizer.observe(key, size, size * per_image_ms / 1000)


def test_nothing_measured_allows_the_configured_maximum() -> None:
    sizer = BatchSizer(8)
    assert sizer.best_size("a") is None
    assert sizer.limit("a") == 8


def test_the_first_batch_of_each_size_is_not_counted() -> None:
    sizer = BatchSizer(8, explore_every=1000)
    sizer.observe("a", 1, 5.0)  # one-off set-up cost
    assert sizer.best_size("a") is None
    sizer.observe("a", 1, 0.1)
    assert sizer.table()["a"] == {1: 100.0}


def test_no_gain_from_batching_caps_at_one() -> None:
    """A CPU at 512 px: a batch of 4 costs four singles."""
    sizer = BatchSizer(8, explore_every=1000)
    feed(sizer, "a", 1, 100)
    feed(sizer, "a", 4, 101)
    assert sizer.best_size("a") == 1
    assert sizer.limit("a") == 1


def test_a_cheaper_batch_raises_the_cap() -> None:
    """A GPU: a batch of 8 costs a fraction of eight singles."""
    sizer = BatchSizer(8, explore_every=1000)
    feed(sizer, "a", 1, 20)
    feed(sizer, "a", 4, 8)
    feed(sizer, "a", 8, 5)
    assert sizer.limit("a") == 8


def test_shapes_learn_separately() -> None:
    sizer = BatchSizer(8, explore_every=1000)
    feed(sizer, "big", 1, 100)
    feed(sizer, "big", 4, 100)
    feed(sizer, "small", 1, 30)
    feed(sizer, "small", 4, 20)
    assert (sizer.limit("big"), sizer.limit("small")) == (1, 4)


def test_exploration_alternates_the_sizes_either_side_of_the_cap() -> None:
    sizer = BatchSizer(8, explore_every=4)
    feed(sizer, "a", 2, 50)
    feed(sizer, "a", 4, 50)  # 4 batches: an exploring turn, downwards
    assert (sizer.best_size("a"), sizer.limit("a")) == (2, 1)
    sizer.observe("a", 2, 0.1)
    assert sizer.limit("a") == 2
    for _ in range(3):
        sizer.observe("a", 2, 0.1)  # 8 batches: an exploring turn, upwards
    assert sizer.limit("a") == 4


def test_costs_follow_a_change_in_the_machine() -> None:
    sizer = BatchSizer(8, explore_every=1000, smoothing=0.5)
    feed(sizer, "a", 1, 100)
    feed(sizer, "a", 2, 60)
    assert sizer.limit("a") == 2
    feed(sizer, "a", 2, 200, times=4)  # batches of two got slow (a noisy neighbour, a throttled GPU)
    assert sizer.limit("a") == 1


async def test_the_batcher_serves_the_capped_size_and_reports_costs() -> None:
    sizer = BatchSizer(8, explore_every=1000)
    feed(sizer, "a", 1, 100)
    feed(sizer, "a", 4, 100)
    model = Recorder()
    model.gate.clear()
    batcher = Batcher(model, shape, max_batch_size=8, max_delay_s=5.0, sizer=sizer)
    with batcher.expecting():  # more on the way: without the cap the batcher would wait to fill 8
        futures = [asyncio.ensure_future(batcher.submit(("a", i))) for i in range(4)]
        await asyncio.sleep(0.05)
        model.gate.set()
        results = await asyncio.wait_for(asyncio.gather(*futures), 3.0)
    assert [len(b) for b in model.batches] == [1, 1, 1, 1]
    assert [r.output for r in results] == [0, 2, 4, 6]
    assert sizer._shapes["a"].batches == 4 + 4
    await batcher.close()


async def test_the_batcher_fills_bigger_batches_where_they_pay() -> None:
    sizer = BatchSizer(8, explore_every=1000)
    feed(sizer, "a", 1, 100)
    feed(sizer, "a", 4, 25)
    model = Recorder()
    model.gate.clear()
    batcher = Batcher(model, shape, max_batch_size=8, max_delay_s=0.0, sizer=sizer)
    futures = [asyncio.ensure_future(batcher.submit(("a", i))) for i in range(9)]
    await asyncio.sleep(0.05)
    model.gate.set()
    await asyncio.wait_for(asyncio.gather(*futures), 3.0)
    # Batches of the cheapest size, 4, not the maximum of 8.
    assert sorted(len(b) for b in model.batches) == [1, 4, 4]
    await batcher.close()
