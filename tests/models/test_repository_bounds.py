"""Reading a model repository's files is bounded (issue 40, point 9): YAML aliases ("billion laughs"), oversized,
overlong and deeply nested files are refused in one short sentence before they cost anything, a reason quotes
little of a file, and a load reads its config off the event loop."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from server.errors import ModelLoadFailed
from server.models.control import ModelControl
from server.models.registry import ModelRegistry
from server.models.repository import (
    MAX_CONFIG_BYTES,
    MAX_CONFIG_NODES,
    MAX_MESSAGE_CHARS,
    BrokenModel,
    ModelConfigError,
    configured_models,
    read_labels_file,
    read_model,
)
from server.settings import Settings
from tests.helpers.model_repository import write_config

MOBILENET = "deeplabv3_mobilenet_v3_large"


def alias_bomb(levels: int = 8, fan: int = 9) -> str:
    """Issue 40's kind of config: under 600 bytes whose `architecture` expands to fan**levels strings (9**8, 43
    million: hundreds of megabytes when quoted whole)."""
    lines = ["architecture:", "  - &l0 [" + ", ".join(['"lol"'] * fan) + "]"]
    lines += [f"  - &l{i} [" + ", ".join([f"*l{i - 1}"] * fan) + "]" for i in range(1, levels)]
    return "\n".join(lines) + "\n"


def _config(repository: Path, name: str, text: str, file_name: str = "config.yaml") -> Path:
    (repository / name).mkdir(parents=True, exist_ok=True)
    path = repository / name / file_name
    path.write_text(text)
    return path


def test_an_alias_bomb_is_refused_at_once_in_one_short_sentence(tmp_path: Path) -> None:
    bomb = alias_bomb()
    assert len(bomb) < 600
    _config(tmp_path, "bomb", bomb)
    started = time.perf_counter()
    with pytest.raises(ModelConfigError) as refused:
        read_model(tmp_path, "bomb")
    assert time.perf_counter() - started < 2
    message = refused.value.message
    assert len(message) <= MAX_MESSAGE_CHARS
    assert message.endswith("config.yaml: the config is refused: line 3: YAML aliases (*name) are not accepted")


def test_a_repository_with_an_alias_bomb_lists_it_with_a_short_reason(tmp_path: Path) -> None:
    """The repository index lists a broken model with the reason its config gave at start-up (the registry's
    entries); the other models are unaffected."""
    _config(tmp_path, "bomb", alias_bomb())
    write_config(tmp_path / "good", architecture=MOBILENET, weights="random")
    models = {model.name: model for model in configured_models(Settings(model_repository=str(tmp_path)))}
    bomb = models["bomb"]
    assert isinstance(bomb, BrokenModel) and not isinstance(models["good"], BrokenModel)
    registry: ModelRegistry[Any] = ModelRegistry()
    registry.add_broken(bomb.name, bomb.reason)
    (entry,) = registry.entries()
    assert entry.state == "UNAVAILABLE" and "YAML aliases" in entry.reason
    assert len(entry.reason) <= MAX_MESSAGE_CHARS


def test_aliases_are_refused_in_labels_files_too(tmp_path: Path) -> None:
    path = _config(tmp_path, "m", "- &c {name: a, color: '#000000'}\n- *c\n", "labels.yaml")
    with pytest.raises(ModelConfigError, match=r"labels.yaml: the labels file is refused: line 2: YAML aliases"):
        read_labels_file(path)


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("architecture: [" + ", ".join(["0"] * (MAX_CONFIG_NODES + 1)) + "]\n", f"more than {MAX_CONFIG_NODES} values"),
        ("architecture: " + "[" * 40 + "]" * 40 + "\n", "line 1: nested more than 16 deep"),
        ("architecture: 1\n" + "#" * MAX_CONFIG_BYTES + "\n", f"the config is over {MAX_CONFIG_BYTES} bytes"),
    ],
    ids=["nodes", "depth", "bytes"],
)
def test_a_config_past_the_bounds_is_refused_before_it_is_built(tmp_path: Path, text: str, problem: str) -> None:
    _config(tmp_path, "m", text)
    with pytest.raises(ModelConfigError, match=problem):
        read_model(tmp_path, "m")


def test_a_deeply_nested_json_config_is_one_sentence_not_a_recursion_error(tmp_path: Path) -> None:
    _config(tmp_path, "m", '{"architecture": ' + "[" * 20_000 + "]" * 20_000 + "}", "config.json")
    with pytest.raises(ModelConfigError, match=r"config.json: the config is nested too deeply"):
        read_model(tmp_path, "m")


@pytest.mark.parametrize(
    "config",
    [
        {"architecture": "x" * 60_000},
        {"architecture": [list(range(300))] * 100},
        {"x" * 60_000: 1},
        {"architecture": MOBILENET, "weights": "/" + "x" * 60_000},
        {"architecture": MOBILENET, "weights": "x" * 60_000 + ".bin"},
        {"architecture": MOBILENET, "max_size": "9" * 60_000},
    ],
)
def test_a_reason_quotes_little_of_the_file(tmp_path: Path, config: dict[str, object]) -> None:
    _config(tmp_path, "m", json.dumps(config), "config.json")
    with pytest.raises(ModelConfigError) as refused:
        read_model(tmp_path, "m")
    assert len(refused.value.message) <= 300, refused.value.message


def test_unknown_fields_of_several_types_are_one_sentence(tmp_path: Path) -> None:
    """Sorting keys of several types raised TypeError (an INTERNAL answer) before."""
    _config(tmp_path, "m", "architecture: deeplabv3_mobilenet_v3_large\n1: a\nb: c\n")
    with pytest.raises(ModelConfigError, match=r"config.yaml: 1: unknown field"):
        read_model(tmp_path, "m")
    path = _config(tmp_path, "m", "- {name: a, 2: x, z: y}\n- b\n", "labels.yaml")
    with pytest.raises(ModelConfigError, match=r"labels\[0\]: unknown field 2"):
        read_labels_file(path)


async def test_a_load_reads_its_config_off_the_event_loop(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """A slow config read (a slow disk, a config at the bounds) leaves the event loop free: a ticker on the loop
    keeps ticking while it runs."""
    readers: list[threading.Thread] = []

    def slow_read(repository: Path, name: str) -> Any:
        readers.append(threading.current_thread())
        time.sleep(0.5)
        raise ModelConfigError(f"{name}: refused after a slow read")

    monkeypatch.setattr("server.models.control.read_model", slow_read)
    control: ModelControl[Any] = ModelControl(
        ModelRegistry(), Settings(model_repository=str(tmp_path), model_control=True), lambda config: None
    )
    gaps: list[float] = []

    async def tick() -> None:
        last = time.perf_counter()
        while True:
            await asyncio.sleep(0.01)
            now = time.perf_counter()
            gaps.append(now - last)
            last = now

    ticker = asyncio.get_running_loop().create_task(tick())
    try:
        with pytest.raises(ModelLoadFailed, match="refused after a slow read"):
            await control.load("m")
    finally:
        ticker.cancel()
    assert readers and readers[0] is not threading.main_thread()
    assert len(gaps) > 10 and max(gaps) < 0.25, max(gaps, default=None)
