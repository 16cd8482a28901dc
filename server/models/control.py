"""Loading, reloading and unloading repository models while the server serves (SEGSERVE_MODEL_CONTROL), for the
inference protocol's repository extension and the CLI. Transport-free; the doors check who is asking.

- A load reads the model's config from the repository by name (never a path), checks the limits, and loads
  beside the models serving; a load that fails leaves every other model serving (and a loaded version of the
  same model serving on).
- Loading a model that is loaded reloads it without a gap: requests go to the old version until the new one
  is warmed up, then to the new one; the old one is closed once its last request is answered.
- An unload refuses new requests for the model (UNAVAILABLE, which clients retry), waits for the ones it
  has, then frees it.
One change at a time: loads and unloads queue behind each other, so the limits hold whatever the callers do.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Generic, Protocol, TypeVar

from server.errors import ModelControlRefused, ModelLoadError, ModelLoadFailed, UnknownModel
from server.models.registry import ModelRegistry, ServedModel
from server.models.repository import ModelConfig, check_name, read_model
from server.settings import Settings

log = logging.getLogger(__name__)


class LoadableModel(ServedModel, Protocol):
    """What loading, swapping and retiring a model need of it, beyond what the registry reads."""

    async def start(self) -> None:
        """Load and warm up; raises ModelLoadError."""

    async def wait_idle(self) -> None:
        """Until no request holds the model."""

    async def close(self) -> None:
        """Free what the model holds."""


M = TypeVar("M", bound=LoadableModel)


class ModelControl(Generic[M]):
    """Changes `registry`'s models; `new_model` builds a model of the repository, not yet started."""

    def __init__(self, registry: ModelRegistry[M], settings: Settings, new_model: Callable[[ModelConfig], M]) -> None:
        self.registry = registry
        self.settings = settings
        self._new_model = new_model
        self.on_change: Callable[[], Awaitable[None]] | None = None
        """Called after each change of a model's state (the app updates the models' health with it)."""
        self._lock: asyncio.Lock | None = None

    @property
    def enabled(self) -> bool:
        return self.settings.model_control

    def check_enabled(self) -> None:
        if not self.enabled:
            raise ModelControlRefused(
                "model control is off: models are loaded at start-up only (SEGSERVE_MODEL_CONTROL=true, with "
                "SEGSERVE_MODEL_REPOSITORY, turns it on)"
            )

    async def load(self, name: str) -> None:
        """Load (or reload) the repository's model `name`. Raises NOT_FOUND, RESOURCE_EXHAUSTED, or
        INVALID_ARGUMENT with the reason its config or weights are unusable."""
        self.check_enabled()
        check_name(name)
        async with self._one_at_a_time():
            repository = Path(self.settings.model_repository or "").expanduser()
            try:
                config = read_model(repository, name)
            except ModelLoadError as exc:
                raise ModelLoadFailed(f"model {name!r} not loaded: {exc.message}") from None
            registry = self.registry
            current = registry.named(name)
            serving = current if current is not None and current.state == "READY" else None
            registry.check_room(config, self.settings, replacing=current)
            model = self._new_model(config)
            if serving is None:
                registry.add(model)  # listed as LOADING meanwhile
                await self._changed()
            log.info("%s model %s", "reloading" if serving else "loading", name)
            try:
                await model.start()
            except ModelLoadError as exc:
                if serving is None:
                    await self._changed()
                    raise ModelLoadFailed(f"model {name!r} not loaded: {exc.message}") from None
                log.error("model %s not reloaded, its loaded version serves on: %s", name, exc.message)
                raise ModelLoadFailed(
                    f"model {name!r} not reloaded, its loaded version serves on: {exc.message}"
                ) from None
            registry.add(model)  # from here on, requests reach the new version
            await self._changed()
            if serving is not None:
                await self._retire(serving)

    async def unload(self, name: str) -> None:
        """Refuse new requests for `name`, wait for the ones it has, free it."""
        self.check_enabled()
        check_name(name)
        async with self._one_at_a_time():
            registry = self.registry
            model = registry.named(name)
            if model is None or model.state == "UNAVAILABLE":
                if model is not None or registry.is_listed(name):
                    registry.add_broken(name, "unloaded")
                    await self._changed()
                    return
                registry.get(name)  # raises NOT_FOUND with the names there are
                raise UnknownModel(f"unknown model {name!r}")
            model.state = "UNLOADING"
            await self._changed()
            log.info("unloading model %s: %d requests to finish", name, model.in_flight)
            await self._retire(model)
            registry.add_broken(name, "unloaded")
            await self._changed()
            log.info("model %s unloaded", name)

    async def _retire(self, model: M) -> None:
        await model.wait_idle()
        await model.close()

    async def _changed(self) -> None:
        if self.on_change is not None:
            await self.on_change()

    def _one_at_a_time(self) -> asyncio.Lock:
        if self._lock is None:  # made inside the event loop
            self._lock = asyncio.Lock()
        return self._lock
