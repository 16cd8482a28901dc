"""The registry's one lookup (`get`), the hold built on it (`acquire`) and its one non-raising query (`named`),
without a server: what each answers for a ready, loading, unloading, failed, unloaded and unknown name, and for
the default model's empty name."""

from __future__ import annotations

from dataclasses import dataclass, field

import grpc
import pytest

from server.errors import SegservError
from server.models.registry import ModelRegistry, ModelState
from server.models.repository import ModelConfig


@dataclass
class FakeModel:
    name: str
    state: ModelState = ModelState.READY
    reason: str = ""
    in_flight: int = 0
    idle_calls: int = 0
    config: ModelConfig = field(init=False)

    def __post_init__(self) -> None:
        self.config = ModelConfig(self.name, "arch", "random", ())

    def became_idle(self) -> None:
        self.idle_calls += 1


def _registry() -> ModelRegistry[FakeModel]:
    registry: ModelRegistry[FakeModel] = ModelRegistry()
    registry.now_ready(FakeModel("ready"))  # the default: the first that became ready
    registry.add(FakeModel("loading", ModelState.LOADING, "warming up"))
    registry.add(FakeModel("unloading", ModelState.UNLOADING))
    registry.add(FakeModel("failed", ModelState.UNAVAILABLE, "bad weights"))
    registry.add_broken("broken", "no config")
    return registry


def _refusal(registry: ModelRegistry[FakeModel], name: str, any_state: bool = False) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(SegservError) as refused:
        registry.get(name, any_state=any_state)
    return refused.value.code, refused.value.message


def test_get_finds_ready_models_and_the_default_for_an_empty_name() -> None:
    registry = _registry()
    assert registry.get("ready").name == "ready"
    assert registry.get("").name == "ready"


def test_get_refuses_what_cannot_serve_with_its_state_and_unknown_names_with_the_names_there_are() -> None:
    registry = _registry()
    unavailable = grpc.StatusCode.UNAVAILABLE
    assert _refusal(registry, "loading") == (unavailable, "model 'loading' is still loading (warming up)")
    assert _refusal(registry, "unloading") == (unavailable, "model 'unloading' is being unloaded")
    assert _refusal(registry, "failed") == (unavailable, "model 'failed' is not loaded: bad weights")
    assert _refusal(registry, "broken") == (unavailable, "model 'broken' is not loaded: no config")
    assert _refusal(registry, "absent") == (
        grpc.StatusCode.NOT_FOUND,
        "unknown model 'absent'; the loaded models are: ready",
    )
    assert _refusal(ModelRegistry(), "") == (unavailable, "no model has loaded yet")


def test_get_in_any_state_finds_every_loaded_model_and_refuses_the_rest_alike() -> None:
    registry = _registry()
    for name in ("ready", "loading", "unloading", "failed"):
        assert registry.get(name, any_state=True).name == name
    assert _refusal(registry, "broken", any_state=True) == _refusal(registry, "broken")
    assert _refusal(registry, "absent", any_state=True) == _refusal(registry, "absent")


def test_acquire_holds_the_ready_model_and_refuses_as_get_does() -> None:
    registry = _registry()
    with registry.acquire("") as model:
        assert model.in_flight == 1
    assert (model.in_flight, model.idle_calls) == (0, 1)
    with pytest.raises(SegservError) as refused, registry.acquire("loading"):
        pass
    assert refused.value.code == grpc.StatusCode.UNAVAILABLE
    assert registry.named("loading") is not None and registry.named("loading").in_flight == 0  # type: ignore[union-attr]


def test_named_never_raises_and_never_means_the_default() -> None:
    registry = _registry()
    assert registry.named("loading") is registry.get("loading", any_state=True)
    assert registry.named("") is None
    assert registry.named("broken") is None
    assert registry.named("absent") is None


def test_mark_unloaded_lists_a_known_name_unloaded_and_refuses_an_unknown_one() -> None:
    registry = _registry()
    registry.mark_unloaded("failed")
    registry.mark_unloaded("broken")
    assert _refusal(registry, "failed") == (grpc.StatusCode.UNAVAILABLE, "model 'failed' is not loaded: unloaded")
    assert _refusal(registry, "broken") == (grpc.StatusCode.UNAVAILABLE, "model 'broken' is not loaded: unloaded")
    with pytest.raises(SegservError) as refused:
        registry.mark_unloaded("absent")
    assert refused.value.code == grpc.StatusCode.NOT_FOUND
