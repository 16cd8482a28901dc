"""The models being served, by name: each a ModelPipeline (server/pipeline.py), plus the default model's name
and the models that could not be loaded, with why. Requests find their model here; unknown names are
NOT_FOUND with the names there are, models not ready are UNAVAILABLE with their state."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING

from server.errors import NotReady, UnknownModel

if TYPE_CHECKING:
    from server.pipeline import ModelPipeline


@dataclass(frozen=True)
class ModelEntry:
    """One line of the repository index."""

    name: str
    state: str
    """READY, LOADING, UNLOADING or UNAVAILABLE (Triton's names)."""
    reason: str
    architecture: str
    is_default: bool


class ModelRegistry:
    def __init__(self) -> None:
        self._models: dict[str, ModelPipeline] = {}
        self._broken: dict[str, str] = {}
        self.default_name = ""

    def add(self, model: ModelPipeline) -> None:
        self._models[model.name] = model
        self._broken.pop(model.name, None)

    def add_broken(self, name: str, reason: str) -> None:
        """A model whose config could not be read: listed with its reason, never served."""
        self._models.pop(name, None)
        self._broken[name] = reason

    def remove(self, name: str) -> None:
        self._models.pop(name, None)

    def find(self, name: str) -> ModelPipeline | None:
        return self._models.get(name or self.default_name)

    def loaded(self) -> list[ModelPipeline]:
        return list(self._models.values())

    def ready_names(self) -> list[str]:
        return [name for name, model in self._models.items() if model.state == "READY"]

    def entries(self) -> list[ModelEntry]:
        entries = [
            ModelEntry(name, model.state, model.reason, model.config.architecture, name == self.default_name)
            for name, model in self._models.items()
        ]
        entries += [
            ModelEntry(name, "UNAVAILABLE", reason, "", name == self.default_name)
            for name, reason in self._broken.items()
        ]
        return sorted(entries, key=lambda entry: entry.name)

    def get(self, name: str) -> ModelPipeline:
        """The ready model called `name` (empty: the default). UNAVAILABLE when it is known but not ready,
        NOT_FOUND when it is not known at all."""
        wanted = name or self.default_name
        model = self._models.get(wanted)
        if model is not None and model.state == "READY":
            return model
        if model is not None:
            if model.state == "LOADING":
                raise NotReady(f"model {wanted!r} is still loading")
            if model.state == "UNLOADING":
                raise NotReady(f"model {wanted!r} is being unloaded")
            raise NotReady(f"model {wanted!r} is not loaded: {model.reason or 'unloaded'}")
        if wanted in self._broken:
            raise NotReady(f"model {wanted!r} is not loaded: {self._broken[wanted]}")
        ready = ", ".join(self.ready_names()) or "none yet"
        raise UnknownModel(f"unknown model {wanted!r}; the loaded models are: {ready}")

    @contextmanager
    def acquire(self, name: str) -> Iterator[ModelPipeline]:
        """The model, counted as in use until the block ends (an unload waits for its count to reach 0)."""
        model = self.get(name)
        model.in_flight += 1
        try:
            yield model
        finally:
            model.in_flight -= 1
