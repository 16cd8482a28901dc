"""The models being served, by name, plus the default model (and why it is the default) and the models that
could not be loaded, with why. Requests find their model here, through one lookup (`get`) and the hold built on
it (`acquire`): unknown names are NOT_FOUND with the names there are, models not ready are UNAVAILABLE with their
state, whichever door or call asks.

Typed against ServedModel, the few attributes it reads, so it never imports the pipeline that builds its
entries (the core's ModelPipeline is one).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from enum import StrEnum
from typing import Generic, Protocol, TypeVar

from server.errors import NotReady, TooManyModels, UnknownModel
from server.models.repository import ModelConfig
from server.settings import Settings

log = logging.getLogger(__name__)

FIRST_LOADED = "the first model that loaded"


class ModelState(StrEnum):
    """A model's state, with Triton's names (its repository index and ModelReady say these words). A StrEnum:
    each is its own name as text, so the doors send it as the string the protocols carry."""

    LOADING = "LOADING"
    READY = "READY"
    UNLOADING = "UNLOADING"
    UNAVAILABLE = "UNAVAILABLE"


class ServedModel(Protocol):
    """What the registry needs of a model."""

    name: str
    config: ModelConfig
    state: ModelState
    reason: str
    in_flight: int
    """Requests that named this model and are not answered yet."""

    def became_idle(self) -> None:
        """Called when in_flight drops to 0 (an unload waits for that)."""


M = TypeVar("M", bound=ServedModel)


@dataclass(frozen=True)
class ModelEntry:
    """One line of the repository index."""

    name: str
    state: ModelState
    reason: str
    architecture: str
    is_default: bool
    default_reason: str = ""
    """Why it is the default: named by SEGSERVE_DEFAULT_MODEL, or the first model that loaded."""


class ModelRegistry(Generic[M]):
    def __init__(self) -> None:
        self._models: dict[str, M] = {}
        self._broken: dict[str, str] = {}
        self._reloading: dict[str, M] = {}
        """New versions being loaded while the loaded version serves on."""
        self.default_name = ""
        """The model requests without a name go to: SEGSERVE_DEFAULT_MODEL, or else the first model that became
        READY (never one that failed, so an unrelated broken folder cannot fail requests that name no model)."""
        self.default_reason = ""

    def name_default(self, name: str, reason: str) -> None:
        self.default_name, self.default_reason = name, reason
        log.info("default model: %s (%s)", name, reason)

    def now_ready(self, model: M) -> None:
        """`model` serves from now on; the first to do so becomes the default when none was named."""
        self.add(model)
        if not self.default_name:
            self.name_default(model.name, FIRST_LOADED)

    def add(self, model: M) -> None:
        self._models[model.name] = model
        self._broken.pop(model.name, None)

    def add_broken(self, name: str, reason: str) -> None:
        """A model whose config could not be read: listed with its reason, never served."""
        self._models.pop(name, None)
        self._broken[name] = reason

    def reloading(self, model: M | None, name: str = "") -> None:
        """`model`: a new version of a model that serves, listed in its reason until it ends; None: it ended."""
        if model is None:
            self._reloading.pop(name, None)
        else:
            self._reloading[model.name] = model

    def mark_unloaded(self, name: str) -> None:
        """Lists `name` as unloaded (UNAVAILABLE, "unloaded"), never served until loaded again; NOT_FOUND, with
        the names there are, for a name that was never listed (nothing to unload)."""
        if name not in self._models and name not in self._broken:
            raise self._unknown(name)
        self.add_broken(name, "unloaded")

    def remove(self, name: str) -> None:
        self._models.pop(name, None)

    def named(self, name: str) -> M | None:
        """The model loaded under exactly `name`, in whatever state, or None (never the default for an empty
        name). The one lookup that never raises, for the callers to whom no model is an answer, not an error:
        model control, which decides between a load and a reload (and what an unload has to free) from what is
        loaded under the name, and the default model's facts while it may still be loading. Requests use `get`."""
        return self._models.get(name) if name else None

    def loaded(self) -> list[M]:
        return list(self._models.values())

    def ready_names(self) -> list[str]:
        return [name for name, model in self._models.items() if model.state == ModelState.READY]

    def entries(self) -> list[ModelEntry]:
        def why(name: str) -> str:
            return self.default_reason if name == self.default_name else ""

        def reason(model: M) -> str:
            new = self._reloading.get(model.name)
            return f"reloading: {new.reason or 'starting'}" if new is not None else model.reason

        entries = [
            ModelEntry(
                name, model.state, reason(model), model.config.architecture, name == self.default_name, why(name)
            )
            for name, model in self._models.items()
        ]
        entries += [
            ModelEntry(name, ModelState.UNAVAILABLE, reason, "", name == self.default_name, why(name))
            for name, reason in self._broken.items()
        ]
        return sorted(entries, key=lambda entry: entry.name)

    def check_room(self, config: ModelConfig, settings: Settings, replacing: M | None = None) -> None:
        """Refuses (RESOURCE_EXHAUSTED, with the figures) a model that would pass SEGSERVE_MAX_MODELS or
        SEGSERVE_MAX_MODEL_WEIGHTS_BYTES. A model being reloaded makes room for its new version: for the moment
        of the swap both are in memory, which the byte limit leaves out."""
        others = [
            m for m in self._models.values() if m is not replacing and m.state in (ModelState.READY, ModelState.LOADING)
        ]
        if settings.max_models and len(others) + 1 > settings.max_models:
            raise TooManyModels(
                f"cannot load {config.name!r}: {len(others)} models are loaded and SEGSERVE_MAX_MODELS="
                f"{settings.max_models}; unload one first"
            )
        held = sum(m.config.weights_bytes for m in others)
        limit = settings.max_model_weights_bytes
        if limit and held + config.weights_bytes > limit:
            raise TooManyModels(
                f"cannot load {config.name!r}: its {config.weights_bytes} bytes of weights and the {held} loaded "
                f"pass SEGSERVE_MAX_MODEL_WEIGHTS_BYTES={limit}"
            )

    def get(self, name: str, *, any_state: bool = False) -> M:
        """The model a request naming `name` goes to (empty: the default model): the one lookup, so that every
        call naming a model hears the same refusals.

        - not listed: NOT_FOUND, with the names of the ready models;
        - listed but not loaded (its load failed, or it was unloaded), or no default yet for an empty name:
          UNAVAILABLE with why;
        - loaded but not READY (loading, unloading, failed at start-up): UNAVAILABLE with its state, unless
          `any_state`: the inference protocol's metadata, config, statistics and readiness describe a model in
          whatever state it is."""
        wanted = name or self.default_name
        if not wanted:
            raise NotReady("no model has loaded yet")
        model = self._models.get(wanted)
        if model is not None and (any_state or model.state == ModelState.READY):
            return model
        if model is not None:
            if model.state == ModelState.LOADING:
                raise NotReady(f"model {wanted!r} is still loading" + (f" ({model.reason})" if model.reason else ""))
            if model.state == ModelState.UNLOADING:
                raise NotReady(f"model {wanted!r} is being unloaded")
            raise NotReady(f"model {wanted!r} is not loaded: {model.reason or 'unloaded'}")
        if wanted in self._broken:
            raise NotReady(f"model {wanted!r} is not loaded: {self._broken[wanted]}")
        raise self._unknown(wanted)

    def _unknown(self, name: str) -> UnknownModel:
        ready = ", ".join(self.ready_names()) or "none yet"
        return UnknownModel(f"unknown model {name!r}; the loaded models are: {ready}")

    @contextmanager
    def acquire(self, name: str) -> Iterator[M]:
        """The ready model `get(name)` finds, counted as in use until the block ends (an unload waits for its
        count to reach 0); refused as `get` refuses."""
        model = self.get(name)
        model.in_flight += 1
        try:
            yield model
        finally:
            model.in_flight -= 1
            if model.in_flight == 0:
                model.became_idle()
