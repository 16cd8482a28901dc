"""A runtime held shut on demand (Gate), so what the server holds while the model is busy can be counted; polling helpers."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import numpy as np

from server.labels import Label
from server.runtimes.base import Runtime
from server.runtimes.factory import create_runtime
from server.settings import ModelSettings
from tests.helpers.servers import ServerThread


class Gate:
    """Wraps a runtime's predict: batches wait while the gate is shut; every batch's size is recorded."""

    def __init__(self, *, gating: bool = True) -> None:
        self.open = threading.Event()
        self.open.set()
        self.batches: list[int] = []
        self.gating = gating
        """False: runtimes built now are left as they are (see `building`)."""

    @contextmanager
    def building(self) -> Iterator[None]:
        """Gate only the runtimes built inside this block (a model loaded at run time, say)."""
        self.gating = True
        try:
            yield
        finally:
            self.gating = False

    def gated_runtime(self, settings: ModelSettings, labels: tuple[Label, ...] | None = None) -> Runtime:
        runtime = create_runtime(settings, labels)
        if not self.gating:
            return runtime
        original: Callable[[list[np.ndarray]], list[np.ndarray]] = runtime.predict

        def predict(images: list[np.ndarray]) -> list[np.ndarray]:
            assert self.open.wait(60), "gate never opened"
            self.batches.append(len(images))
            return original(images)

        runtime.predict = predict  # type: ignore[method-assign]
        return runtime


def wait_until(condition: Callable[[], bool], what: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting until {what}"
        time.sleep(0.01)


def sample(server: ServerThread, name: str, **labels: str) -> float:
    assert server.app.metrics is not None
    return server.app.metrics.registry.get_sample_value(name, labels) or 0.0
