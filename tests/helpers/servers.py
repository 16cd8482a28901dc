"""The real app in a background event loop (ServerThread), as `python -m server` runs it, and the settings tests serve with."""

from __future__ import annotations

import asyncio
import threading
from concurrent.futures import Future
from pathlib import Path

import torch

from server.app import App, create_app
from server.core.model_pipeline import RuntimeFactory
from server.core.pipeline import SegmentationPipeline
from server.runtimes.factory import create_runtime
from server.settings import Settings
from tests.helpers import known_model

TEST_MAX_SIZE = 64
CONTROL_TOKEN = "segserve-tests-control-token"
"""The model-control token of the tests' servers (tests/conftest.py sets SEGSERVE_CONTROL_TOKEN to it)."""
CONTROL_HEADERS = {"authorization": f"Bearer {CONTROL_TOKEN}"}


class ServerThread:
    """Runs the real gRPC app in its own event loop thread, as `python -m server` would."""

    def __init__(self, settings: Settings, runtime_factory: RuntimeFactory = create_runtime) -> None:
        self.settings = settings
        self.runtime_factory = runtime_factory
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True, name="test-server")
        self.thread.start()
        self.app: App = self.call(self._start())
        self.port = self.app.port
        self.target = f"127.0.0.1:{self.port}"

    async def _start(self) -> App:
        torch.manual_seed(0)  # the same random weights in every run
        app = await create_app(self.settings, SegmentationPipeline(self.settings, runtime_factory=self.runtime_factory))
        await app.start()
        return app

    def call(self, coro, timeout: float = 120):  # type: ignore[no-untyped-def]
        future: Future = asyncio.run_coroutine_threadsafe(coro, self.loop)
        return future.result(timeout)

    def stop(self, grace: float = 1.0) -> None:
        self.call(self.app.stop(grace))
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


def make_settings(**overrides: object) -> Settings:
    values: dict[str, object] = {
        "host": "127.0.0.1",
        "port": 0,
        "weights": "random",
        "device": "cpu",
        "max_size": TEST_MAX_SIZE,
        "grace_period_s": 1.0,
        "metrics_port": 0,
        "http_port": 0,
    }
    values.update(overrides)
    return Settings(**values)  # type: ignore[arg-type]


KNOWN_MAX_SIZE = 128  # the scale the known-answer model was trained at


def known_settings(weights: Path, **overrides: object) -> Settings:
    """Settings serving the known-answer model at the size it was trained for."""
    values: dict[str, object] = {
        "weights": str(weights),
        "model": known_model.MODEL_NAME,
        "max_size": KNOWN_MAX_SIZE,
    }
    values.update(overrides)
    return make_settings(**values)
