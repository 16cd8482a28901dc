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

A change is the server's job, not its caller's. Once accepted it runs as a task of its own to its end, whatever
the caller does: a caller whose deadline passes, or who hangs up, stops waiting and nothing more (before, the
cancelled call cancelled the load, which left the model LOADING for good while its worker thread went on
exporting and measuring). A load ends READY or, on any failure, UNAVAILABLE with the reason, with whatever it
built closed. A second load of a model whose load is in progress joins it rather than starting another. One that
went away reads the outcome from the repository index, ListModels, health `model/NAME`, the log and the metrics.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Coroutine
from pathlib import Path
from typing import Any, Generic, Protocol, TypeVar

from opentelemetry import trace

from server.errors import ModelControlRefused, ModelLoadError, ModelLoadFailed
from server.models.registry import ModelRegistry, ModelState, ServedModel
from server.models.repository import ModelConfig, check_name, read_model
from server.settings import Settings

log = logging.getLogger(__name__)
# A load is seconds of work, rare: the API's tracer (a no-op while tracing is off) costs nothing worth a check.
tracer = trace.get_tracer(__name__)


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
        self._loads: dict[str, asyncio.Task[None]] = {}
        """Loads accepted and not ended, by model name: a second load of one of them joins it."""
        self._unloads: set[asyncio.Task[None]] = set()

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
        """Load (or reload) the repository's model `name`, and wait for the outcome. Raises NOT_FOUND,
        RESOURCE_EXHAUSTED, or INVALID_ARGUMENT with the reason its config or weights are unusable. The load
        goes on if the caller stops waiting; a load of `name` in progress is joined, not repeated."""
        self.check_enabled()
        check_name(name)
        task = self._loads.get(name)
        if task is None:
            task = self._loads[name] = self._run(self._load(name), f"load of model {name}")
            task.add_done_callback(lambda _: self._loads.pop(name, None))
        else:
            log.info("a load of model %s is in progress; this one waits for it", name)
        await self._wait_for(task, f"load of model {name}")

    def loading(self, name: str) -> bool:
        """Whether a load of `name` is accepted and not ended."""
        return name in self._loads

    async def _load(self, name: str) -> None:
        # In the trace of the call that asked for it (the task is made in its context): waiting for the
        # changes before it, reading its config, then the model's start with its phases.
        with tracer.start_as_current_span("load model", attributes={"segserve.model": name}):
            await self._load_in_span(name)

    async def _load_in_span(self, name: str) -> None:
        async with self._one_at_a_time():
            repository = Path(self.settings.model_repository or "").expanduser()
            try:  # on a thread: file I/O and YAML parsing, too slow for the event loop at their bounds
                with tracer.start_as_current_span("read config"):
                    config = await asyncio.to_thread(read_model, repository, name)
            except ModelLoadError as exc:
                raise ModelLoadFailed(f"model {name!r} not loaded: {exc.message}") from None
            registry = self.registry
            current = registry.named(name)
            serving = current if current is not None and current.state == ModelState.READY else None
            registry.check_room(config, self.settings, replacing=current)
            model = self._new_model(config)
            if serving is None:
                registry.add(model)  # listed as LOADING meanwhile
            else:
                registry.reloading(model)  # listed in the loaded version's reason meanwhile
            await self._changed()
            log.info("%s model %s", "reloading" if serving else "loading", name)
            try:
                await model.start()
            except BaseException as exc:  # a load error, a bug, or the server stopping: never left LOADING
                await self._discard(model, serving, exc)
                raise
            finally:
                registry.reloading(None, name)
            registry.now_ready(model)  # from here on, requests reach the new version
            await self._changed()
            if serving is not None:
                await self._retire(serving)

    async def _discard(self, model: M, serving: M | None, exc: BaseException) -> None:
        """A load that failed: what it built is closed; the model is listed UNAVAILABLE with the reason (or its
        loaded version serves on). Turns a ModelLoadError into the caller's ModelLoadFailed."""
        name = model.name
        if isinstance(exc, ModelLoadError):
            reason = exc.message
        elif isinstance(exc, asyncio.CancelledError):
            reason = "its load was stopped (the server is shutting down)"
        else:
            reason = f"its load failed: {exc!r} (a bug: the traceback is in the log)"
            log.error("load of model %s failed", name, exc_info=exc)
        try:
            await model.close()
        finally:
            if serving is None:
                self.registry.add_broken(name, reason)
                log.error("model %s not loaded: %s", name, reason)
            else:
                log.error("model %s not reloaded, its loaded version serves on: %s", name, reason)
            await self._changed()
        if isinstance(exc, ModelLoadError):
            if serving is None:
                raise ModelLoadFailed(f"model {name!r} not loaded: {reason}") from None
            raise ModelLoadFailed(f"model {name!r} not reloaded, its loaded version serves on: {reason}") from None

    async def unload(self, name: str) -> None:
        """Refuse new requests for `name`, wait for the ones it has, free it. Goes on if the caller stops waiting
        (a model left UNLOADING would refuse its requests for good)."""
        self.check_enabled()
        check_name(name)
        task = self._run(self._unload(name), f"unload of model {name}")
        self._unloads.add(task)
        task.add_done_callback(self._unloads.discard)
        await self._wait_for(task, f"unload of model {name}")

    async def _unload(self, name: str) -> None:
        async with self._one_at_a_time():
            registry = self.registry
            model = registry.named(name)
            if model is None or model.state == ModelState.UNAVAILABLE:  # nothing loaded to free
                registry.mark_unloaded(name)  # NOT_FOUND, with the names there are, for a name never listed
                await self._changed()
                return
            model.state = ModelState.UNLOADING
            await self._changed()
            log.info("unloading model %s: %d requests to finish", name, model.in_flight)
            await self._retire(model)
            registry.mark_unloaded(name)
            await self._changed()
            log.info("model %s unloaded", name)

    @staticmethod
    def _run(change: Coroutine[Any, Any, None], what: str) -> asyncio.Task[None]:
        task = asyncio.get_running_loop().create_task(change, name=what)
        # Read its outcome even when every caller has gone, so asyncio never warns about it.
        task.add_done_callback(lambda t: t.cancelled() or t.exception())
        return task

    @staticmethod
    async def _wait_for(task: asyncio.Task[None], what: str) -> None:
        try:
            await asyncio.shield(task)
        except asyncio.CancelledError:
            if not task.done():
                log.info("the caller of the %s stopped waiting; it goes on", what)
            raise

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
