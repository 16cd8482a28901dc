"""Adaptive batch size: learn, per input shape, which batch size gives the cheapest image, and cap batches there.

Batching pays only where the device runs a batch of n faster than n single images. On a GPU it does;
on a small CPU at 512 pixels a batch of 4 can cost exactly four singles, and then waiting to fill a
batch only adds latency. So the batcher reports each batch's model time here, and asks for a cap:

- cost[shape][n] is an exponentially weighted mean of seconds per image over batches of n.
  The first batch of each (shape, n) is not counted: it pays one-off kernel set-up.
- The cap is the smallest measured n whose cost is within `tolerance` of the cheapest one
  (equal cost per image: the smaller batch, for lower latency).
- Every `explore_every`-th batch of a shape is capped at twice the cap, the next such turn at half of
  it, so the sizes either side of it keep being measured; with nothing measured, the cap is the maximum.
"""

from __future__ import annotations

import logging
from collections.abc import Hashable
from dataclasses import dataclass, field

log = logging.getLogger(__name__)


@dataclass
class _ShapeCosts:
    per_image_s: dict[int, float] = field(default_factory=dict)
    seen: set[int] = field(default_factory=set)
    batches: int = 0


class BatchSizer:
    def __init__(
        self,
        max_batch_size: int,
        *,
        smoothing: float = 0.3,
        tolerance: float = 0.05,
        explore_every: int = 16,
        max_shapes: int = 256,
    ) -> None:
        self.max_batch_size = max_batch_size
        self.smoothing = smoothing
        self.tolerance = tolerance
        self.explore_every = explore_every
        self.max_shapes = max_shapes
        self._shapes: dict[Hashable, _ShapeCosts] = {}

    def observe(self, shape: Hashable, size: int, seconds: float) -> None:
        """One batch of `size` images of `shape` took `seconds` of model time."""
        costs = self._shapes.get(shape)
        if costs is None:
            if len(self._shapes) >= self.max_shapes:  # forget the oldest shape rather than grow without end
                del self._shapes[next(iter(self._shapes))]
            costs = self._shapes[shape] = _ShapeCosts()
        costs.batches += 1
        if size not in costs.seen:
            costs.seen.add(size)
            return
        per_image = seconds / size
        old = costs.per_image_s.get(size)
        best_before = self.best_size(shape)
        costs.per_image_s[size] = per_image if old is None else old + self.smoothing * (per_image - old)
        if (best := self.best_size(shape)) != best_before:
            log.info(
                "batch size for shape %s now %s (ms per image by batch size: %s)", shape, best, self.table()[shape]
            )

    def best_size(self, shape: Hashable) -> int | None:
        """The smallest batch size within tolerance of the cheapest per image; None until one is measured."""
        costs = self._shapes.get(shape)
        if costs is None or not costs.per_image_s:
            return None
        cheapest = min(costs.per_image_s.values())
        return min(n for n, cost in costs.per_image_s.items() if cost <= cheapest * (1 + self.tolerance))

    def limit(self, shape: Hashable) -> int:
        """The most images the next batch of `shape` may hold."""
        best = self.best_size(shape)
        if best is None:
            return self.max_batch_size
        batches = self._shapes[shape].batches
        if batches % self.explore_every:
            return best
        # Exploring turns alternate: twice the cap (would a bigger batch pay?), then half of it (is a
        # smaller size still worse? under load, sizes below the cap stop being served and measured).
        upwards = (batches // self.explore_every) % 2 == 0
        return min(self.max_batch_size, best * 2) if upwards else max(1, best // 2)

    def table(self) -> dict[Hashable, dict[int, float]]:
        """Milliseconds per image by batch size, per shape: what the cap is based on."""
        return {
            shape: {n: round(s * 1000, 1) for n, s in sorted(c.per_image_s.items())}
            for shape, c in self._shapes.items()
        }
