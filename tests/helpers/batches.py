"""A recording stand-in for a model, for the batcher tests."""

from __future__ import annotations

import threading
import time


class Recorder:
    """A fake model: records each batch it gets and returns the items doubled."""

    def __init__(self, delay_s: float = 0.0, fail: bool = False) -> None:
        self.batches: list[list[tuple[str, int]]] = []
        self.delay_s = delay_s
        self.fail = fail
        self.gate = threading.Event()
        self.gate.set()

    def __call__(self, items: list[tuple[str, int]]) -> list[int]:
        self.gate.wait(5)
        self.batches.append(list(items))
        time.sleep(self.delay_s)
        if self.fail:
            raise ValueError("model exploded")
        return [value * 2 for _, value in items]


def shape(item: tuple[str, int]) -> str:
    return item[0]
