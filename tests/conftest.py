"""Fixtures: a real server on a free port (in a background event loop), clients, test images."""

from __future__ import annotations

import asyncio
import io
import os
import struct
import threading
import zlib
from collections.abc import Iterator
from concurrent.futures import Future
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from client import SegmentClient
from server.app import App, create_app
from server.core.model_pipeline import RuntimeFactory
from server.core.pipeline import SegmentationPipeline
from server.runtimes.factory import create_runtime
from server.settings import Settings
from tests import known_model

pytest_plugins = ["tests.no_skips"]

# Servers the tests start (in-process or `python -m server`) take a free HTTP port, never the default 8000,
# which a developer's own server may hold and several test servers would compete for.
os.environ.setdefault("SEGSERVE_HTTP_PORT", "0")

TEST_MAX_SIZE = 64


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


@pytest.fixture(scope="session")
def server() -> Iterator[ServerThread]:
    running = ServerThread(make_settings())
    yield running
    running.stop()


@pytest.fixture(scope="session")
def known_weights() -> Path:
    """The known-answer model's state_dict (tests/known_model.py); trained on first use, then cached."""
    return known_model.known_weights()


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


@pytest.fixture(scope="session")
def known_server(known_weights: Path) -> Iterator[ServerThread]:
    """A server whose masks depend on the image: use it for every test that judges a mask."""
    running = ServerThread(known_settings(known_weights))
    yield running
    running.stop()


@pytest.fixture(scope="session")
def client(server: ServerThread) -> Iterator[SegmentClient]:
    with SegmentClient(server.target, timeout=60) as c:
        yield c


def encode(image: Image.Image, fmt: str = "PNG", **params: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **params)
    return buffer.getvalue()


def photo_like(width: int, height: int, seed: int = 0) -> Image.Image:
    """A smooth, photo-like RGB image (gradients plus blobs), deterministic per seed."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    channels = []
    for _ in range(3):
        fx, fy, phase = [*rng.uniform(0.5, 4, 2).tolist(), rng.uniform(0, 6.28)]
        channels.append(
            127 + 120 * np.sin(x / max(width, 1) * fx * 6.28 + phase) * np.cos(y / max(height, 1) * fy * 6.28)
        )
    return Image.fromarray(np.stack(channels, axis=-1).clip(0, 255).astype(np.uint8))


def png_declaring(width: int, height: int) -> bytes:
    """A valid 1x1 PNG whose header is rewritten to claim width x height: a few dozen bytes."""
    data = bytearray(encode(Image.new("L", (1, 1))))
    ihdr = 8 + 8  # signature, then the IHDR chunk's length and type
    data[ihdr : ihdr + 8] = struct.pack(">II", width, height)
    crc = zlib.crc32(bytes(data[ihdr - 4 : ihdr + 13]))
    data[ihdr + 13 : ihdr + 17] = struct.pack(">I", crc)
    return bytes(data)


@pytest.fixture
def jpeg_bytes() -> bytes:
    return encode(photo_like(160, 120), "JPEG", quality=90)
