"""Reads the project's container files the way Docker Compose and VS Code would, for the tests."""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import json5
import yaml

REPO = Path(__file__).resolve().parents[2]
COMPOSE = REPO / "docker-compose.yml"
COMPOSE_DEBUG = REPO / "docker-compose.debug.yml"
DEVCONTAINER = REPO / ".devcontainer" / "devcontainer.json"
LAUNCH = REPO / ".vscode" / "launch.json"
DOCKERFILE = REPO / "Dockerfile"

_VARIABLE = re.compile(
    r"\$(?:(?P<escaped>\$)|\{(?P<braced>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:?[-+?])(?P<arg>[^}]*))?\}"
    r"|(?P<plain>[A-Za-z_][A-Za-z0-9_]*))"
)


def interpolate(value: Any, env: Mapping[str, str]) -> Any:
    """Compose's variable interpolation: $VAR, ${VAR}, ${VAR:-default}, ${VAR-default}, ${VAR:+alt}, ${VAR+alt}, $$."""
    if isinstance(value, dict):
        return {key: interpolate(item, env) for key, item in value.items()}
    if isinstance(value, list):
        return type(value)(interpolate(item, env) for item in value)  # a ResetList stays one
    if not isinstance(value, str):
        return value

    def substitute(match: re.Match[str]) -> str:
        if match["escaped"]:
            return "$"
        name = match["braced"] or match["plain"]
        op, arg = match["op"], match["arg"] or ""
        is_set, non_empty = name in env, bool(env.get(name))
        if op == ":-":
            return env[name] if non_empty else arg
        if op == "-":
            return env[name] if is_set else arg
        if op == ":+":
            return arg if non_empty else ""
        if op == "+":
            return arg if is_set else ""
        if op in (":?", "?") and not (non_empty if op == ":?" else is_set):
            raise ValueError(f"required variable {name} is missing: {arg}")
        return env.get(name, "")

    return _VARIABLE.sub(substitute, value)


class ResetList(list[Any]):
    """A YAML sequence tagged !reset: Compose drops what earlier files set, instead of adding to it."""


class _ComposeLoader(yaml.SafeLoader):
    """yaml's safe loader plus Compose's !reset tag, so an overlay loads as Compose reads it."""


def _reset_constructor(loader: yaml.SafeLoader, node: yaml.Node) -> Any:
    if isinstance(node, yaml.SequenceNode):
        return ResetList(loader.construct_sequence(node, deep=True))
    if isinstance(node, yaml.MappingNode):
        return loader.construct_mapping(node, deep=True)
    return None  # `!reset null`: the key as if no earlier file had set it


def _reset_representer(dumper: yaml.SafeDumper, data: ResetList) -> yaml.Node:
    return dumper.represent_sequence("!reset", list(data))


_ComposeLoader.add_constructor("!reset", _reset_constructor)
yaml.SafeDumper.add_representer(ResetList, _reset_representer)


def load_yaml(path: Path) -> dict[str, Any]:
    data = yaml.load(path.read_text(), Loader=_ComposeLoader)  # a SafeLoader with one more tag
    assert isinstance(data, dict), f"{path.name} is not a mapping"
    return data


def load_jsonc(path: Path) -> dict[str, Any]:
    """JSON with comments (and trailing commas), as VS Code reads devcontainer.json and launch.json."""
    data = json5.loads(path.read_text())
    assert isinstance(data, dict), f"{path.name} is not an object"
    return data


def compose_service(path: Path, name: str, env: Mapping[str, str] | None = None) -> dict[str, Any]:
    service = load_yaml(path)["services"][name]
    return interpolate(service, env or {})  # type: ignore[no-any-return]


def command_args(command: str | list[str]) -> list[str]:
    """A service's command as the argv Compose hands the container (a string is split like a shell would)."""
    return shlex.split(command) if isinstance(command, str) else list(command)


def bind_mount_of_checkout(service: Mapping[str, Any]) -> str:
    """The container folder where the service mounts the checkout (the compose file's folder, `.`)."""
    for volume in service.get("volumes", []):
        if isinstance(volume, str):
            source, _, rest = volume.partition(":")
            target = rest.split(":")[0]
        else:
            source, target = volume.get("source", ""), volume.get("target", "")
        if source in (".", "./"):
            return str(target)
    raise AssertionError(f"no bind mount of the checkout in {service}")


def debug_launch_config() -> dict[str, Any]:
    configurations = load_jsonc(LAUNCH)["configurations"]
    matches = [c for c in configurations if c.get("name") == "Attach to server (debugpy)"]
    assert len(matches) == 1, "launch.json needs exactly one 'Attach to server (debugpy)'"
    return matches[0]  # type: ignore[no-any-return]


def dockerfile_stages() -> dict[str, list[str]]:
    """Stage name -> its instructions (continuation lines joined, comments dropped)."""
    text = re.sub(r"\\\n\s*", " ", DOCKERFILE.read_text())
    stages: dict[str, list[str]] = {}
    current: list[str] = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if match := re.match(r"FROM\s+\S+\s+AS\s+(\S+)", line, re.IGNORECASE):
            current = stages.setdefault(match.group(1), [])
        current.append(line)
    return stages


def compose_v2() -> list[str] | None:
    """The command of an installed Docker Compose v2 (the docker CLI's plugin or the standalone binary)."""
    for command in (["docker", "compose"], ["docker-compose"]):
        if shutil.which(command[0]) is None:
            continue
        probe = subprocess.run([*command, "version"], capture_output=True, text=True, timeout=30)
        if probe.returncode == 0 and re.search(r"v?2\.\d+", probe.stdout):
            return command
    return None
