"""Dynamic batcher: groups concurrent same-shaped requests into one model call.

Rules, all in `_next_batch`:
- Only items of one shape share a batch (padding would leak neighbours into DeepLabV3's
  global-pooling branch, so a mask would depend on the rest of the batch).
- A batch goes to the model when it is full, when its oldest item has waited max_delay,
  or at once when no other request is on its way (a lone request never waits). Every group is
  looked at: a full batch of one shape never waits behind another shape's group still filling.
- One batch runs at a time per model instance (one by default), each on a worker thread of its
  own; while they run, arrivals pile up and form the next batch, so batches grow with load by themselves.
- Items whose caller cancelled or whose deadline passed are dropped before the model.
- An exception from the model reaches every caller in that batch.
- With a BatchSizer, "full" means the size it finds cheapest per image for that shape
  (server/core/batch_sizing.py), so a device that gains nothing from batches is not made to wait for them.
- With a tracer (tracing on), each item's wait is a "queue" span and each batch one "batch" span (its size and
  `span_attributes` as attributes) holding the "model" span of the runtime's call: the batch is a child of its
  oldest item's span and links to every item's queue span, and each queue span links back to the batch, so
  every caller that shared it finds it from its own trace. Without one, none of that work is done.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Callable, Hashable, Iterator, Sequence
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.trace import Link, Span, Tracer
from opentelemetry.util.types import AttributeValue

from server.core.batch_sizing import BatchSizer
from server.core.thread_names import MODEL, naming
from server.errors import RequestExpired

log = logging.getLogger(__name__)

In = TypeVar("In")
Out = TypeVar("Out")


@dataclass
class BatchResult(Generic[Out]):
    output: Out
    batch_size: int
    queue_ms: float
    inference_ms: float


@dataclass
class _Pending(Generic[In, Out]):
    item: In
    future: asyncio.Future[BatchResult[Out]]
    deadline: float | None
    enqueued: float = field(default_factory=time.monotonic)
    queue_span: Span | None = None
    """Its wait, ended when its batch starts (tracing on only)."""
    parent: otel_context.Context | None = None
    """The context it was submitted in: a batch is a child of its oldest item's (tracing on only)."""

    def end_queue_span(self, why: str) -> None:
        if self.queue_span is not None:
            self.queue_span.set_attribute("segserve.dropped", why)
            self.queue_span.end()

    def expired(self, now: float) -> bool:
        return self.deadline is not None and now >= self.deadline


THREADS_END_S = 10.0
"""How long close() waits for the model's threads to end."""


class Batcher(Generic[In, Out]):
    """`run_batch(items) -> outputs` runs on `instances` worker threads at most (one batch each);
    `submit` awaits one item's output."""

    def __init__(
        self,
        run_batch: Callable[[list[In]], Sequence[Out]],
        shape_of: Callable[[In], Hashable],
        max_batch_size: int = 8,
        max_delay_s: float = 0.005,
        executor: Executor | None = None,
        sizer: BatchSizer | None = None,
        instances: int = 1,
        on_batch: Callable[[int, float], None] | None = None,
        tracer: Tracer | None = None,
        span_attributes: dict[str, AttributeValue] | None = None,
    ) -> None:
        self._run_batch = run_batch
        self._shape_of = shape_of
        self.max_batch_size = max_batch_size
        self.max_delay_s = max_delay_s
        self.sizer = sizer
        self.instances = instances
        self._on_batch = on_batch
        """Told of each batch the model ran: its size and the seconds it took (the model's statistics)."""
        self._tracer = tracer
        """None when tracing is off: no span work at all."""
        self._span_attributes = span_attributes or {}
        self._executor = executor or ThreadPoolExecutor(
            max_workers=instances, thread_name_prefix="model", initializer=naming(MODEL)
        )
        self._running: set[asyncio.Task[None]] = set()
        self._groups: dict[Hashable, deque[_Pending[In, Out]]] = {}
        self._on_the_way = 0
        self.batch_size_counts: list[int] = [0] * max_batch_size
        # Loop-bound objects are made on first use, inside the server's event loop.
        self._wakeup: asyncio.Event | None = None
        self._task: asyncio.Task[None] | None = None

    # ---- producer side -------------------------------------------------------------------

    @contextlib.contextmanager
    def expecting(self) -> Iterator[None]:
        """Marks a request as on its way (being decoded), so batches wait for it rather than leave without it."""
        self._on_the_way += 1
        try:
            yield
        finally:
            self._on_the_way -= 1
            self._wake()

    async def submit(self, item: In, deadline: float | None = None) -> BatchResult[Out]:
        """Queue one item and wait for its output. `deadline` is a time.monotonic() value."""
        self._ensure_started()
        future: asyncio.Future[BatchResult[Out]] = asyncio.get_running_loop().create_future()
        pending = _Pending(item, future, deadline)
        if self._tracer is not None:
            pending.parent = otel_context.get_current()
            pending.queue_span = self._tracer.start_span("queue")
        self._groups.setdefault(self._shape_of(item), deque()).append(pending)
        self._wake()
        return await future

    @property
    def queued(self) -> int:
        return sum(len(group) for group in self._groups.values())

    # ---- consumer side -------------------------------------------------------------------

    def _ensure_started(self) -> None:
        if self._task is None or self._task.done():
            self._wakeup = asyncio.Event()
            self._task = asyncio.get_running_loop().create_task(self._loop(), name="batcher")

    def _wake(self) -> None:
        if self._wakeup is not None:
            self._wakeup.set()

    async def _loop(self) -> None:
        assert self._wakeup is not None
        while True:
            if len(self._running) >= self.instances:
                await asyncio.wait(self._running, return_when=asyncio.FIRST_COMPLETED)
                continue
            batch, wait_s = self._next_batch()
            if batch:
                running = asyncio.get_running_loop().create_task(self._dispatch(batch, self._shape_of(batch[0].item)))
                self._running.add(running)
                running.add_done_callback(self._running.discard)
                continue
            self._wakeup.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wakeup.wait(), timeout=wait_s)

    def _next_batch(self) -> tuple[list[_Pending[In, Out]], float | None]:
        """The batch to run now, or how long to wait before looking again (None: until woken)."""
        now = time.monotonic()
        self._drop_dead(now)
        if not self._groups:
            return [], None
        by_age = sorted(self._groups.items(), key=lambda kv: kv[1][0].enqueued)
        oldest_shape, oldest = by_age[0]
        waited = now - oldest[0].enqueued
        if waited >= self.max_delay_s or self._on_the_way == 0:
            # Overdue (or nothing more can join it) goes first, so a run of full batches cannot starve it.
            return self._take(oldest_shape), None
        # Any full group goes now, whatever its age: it has nothing left to wait for.
        for shape, group in by_age:
            if len(group) >= self._limit(shape):
                return self._take(shape), None
        return [], self.max_delay_s - waited

    def _limit(self, shape: Hashable) -> int:
        return self.sizer.limit(shape) if self.sizer else self.max_batch_size

    def _take(self, shape: Hashable) -> list[_Pending[In, Out]]:
        group = self._groups[shape]
        batch = [group.popleft() for _ in range(min(self._limit(shape), len(group)))]
        if not group:
            del self._groups[shape]
        return batch

    def _drop_dead(self, now: float) -> None:
        for shape in list(self._groups):
            alive: deque[_Pending[In, Out]] = deque()
            for pending in self._groups[shape]:
                if pending.future.done():  # the caller cancelled
                    pending.end_queue_span("cancelled")
                    continue
                if pending.expired(now):
                    pending.future.set_exception(RequestExpired("deadline passed while waiting for the model"))
                    pending.end_queue_span("deadline")
                    continue
                alive.append(pending)
            if alive:
                self._groups[shape] = alive
            else:
                del self._groups[shape]

    async def _dispatch(self, batch: list[_Pending[In, Out]], shape: Hashable) -> None:
        if self._tracer is not None:
            await self._traced_dispatch(self._tracer, batch, shape)
        else:
            await self._run(batch, shape, self._run_batch)

    async def _traced_dispatch(self, tracer: Tracer, batch: list[_Pending[In, Out]], shape: Hashable) -> None:
        """_dispatch with the batch's span, the runtime's call in a "model" span inside it, the items' queue
        spans ended as the batch starts and linked to it."""
        links = [Link(p.queue_span.get_span_context()) for p in batch if p.queue_span is not None]
        attributes: dict[str, AttributeValue] = {"segserve.batch.size": len(batch), **self._span_attributes}
        with tracer.start_as_current_span("batch", batch[0].parent, links=links, attributes=attributes) as span:
            for pending in batch:
                if pending.queue_span is not None:
                    pending.queue_span.add_link(span.get_span_context())
                    pending.queue_span.set_attribute("segserve.batch.size", len(batch))
                    pending.queue_span.end()
            batch_context = otel_context.get_current()

            def run_batch(items: list[In]) -> Sequence[Out]:
                token = otel_context.attach(batch_context)  # on the model's thread: "model" is the batch's child
                try:
                    with tracer.start_as_current_span("model", attributes=self._span_attributes):
                        return self._run_batch(items)
                finally:
                    otel_context.detach(token)

            if not await self._run(batch, shape, run_batch):
                span.set_status(trace.StatusCode.ERROR, "the model failed")

    async def _run(
        self, batch: list[_Pending[In, Out]], shape: Hashable, run_batch: Callable[[list[In]], Sequence[Out]]
    ) -> bool:
        """Runs one batch and answers its callers; False when the model failed."""
        started = time.monotonic()
        loop = asyncio.get_running_loop()
        try:
            outputs = await loop.run_in_executor(self._executor, run_batch, [p.item for p in batch])
            if len(outputs) != len(batch):
                raise RuntimeError(f"model returned {len(outputs)} outputs for a batch of {len(batch)}")
        except Exception as exc:
            log.exception("batch of %d failed", len(batch))
            for pending in batch:
                if not pending.future.done():
                    pending.future.set_exception(exc)
            return False
        inference_s = time.monotonic() - started
        inference_ms = inference_s * 1000
        if self.sizer is not None:
            self.sizer.observe(shape, len(batch), inference_s)
        self.batch_size_counts[len(batch) - 1] += 1
        if self._on_batch is not None:
            self._on_batch(len(batch), inference_s)
        for pending, output in zip(batch, outputs, strict=True):
            if not pending.future.done():
                queue_ms = (started - pending.enqueued) * 1000
                pending.future.set_result(BatchResult(output, len(batch), queue_ms, inference_ms))
        return True

    async def close(self) -> None:
        """Stops batching and waits, off the event loop, until the model's threads have ended: what they held
        (a thread's runtime caches, its OpenMP team) is freed only then, and an unload hands memory back after."""
        for task in [self._task, *self._running]:
            if task is None:
                continue
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._executor.shutdown(wait=False, cancel_futures=True)
        ended = asyncio.get_running_loop().run_in_executor(None, self._executor.shutdown)
        with contextlib.suppress(TimeoutError):  # a batch stuck in a runtime must not hold up the shutdown
            await asyncio.wait_for(ended, THREADS_END_S)
