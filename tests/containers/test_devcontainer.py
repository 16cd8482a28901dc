"""The dev container as VS Code brings it up: @devcontainers/cli with the project's devcontainer.json.

The test's only addition (--override-config) is the loopback compose override at the end of
dockerComposeFile; everything else is the project's file as it is.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.containers.compose import ServerPorts, Stack, docker, free_port, loopback_override
from tests.helpers.container_files import load_jsonc


def devcontainer(*args: str, env: dict[str, str], timeout: float) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["devcontainer", *args], capture_output=True, text=True, timeout=timeout, env=env, check=False
    )


def test_devcontainer_up_serves_and_has_the_tools(
    images: dict[str, str], stacks: Callable[..., Stack], checkout: Path, tmp_path: Path
) -> None:
    if shutil.which("devcontainer") is None:
        if os.environ.get("SEGSERVE_REQUIRE_DOCKER") == "1":
            pytest.fail("the devcontainer CLI is missing (npm install -g @devcontainers/cli)")
        pytest.skip("the devcontainer CLI is missing (npm install -g @devcontainers/cli)")
    ports, debug_port = ServerPorts(), free_port()
    # Brought down by the fixture like any stack: the same files and project name the CLI is given.
    stack = stacks(
        loopback_override(images, {"server": ports}, debug=True, ui_port=free_port()),
        debug=True,
        project_dir=checkout,
    )
    config = load_jsonc(checkout / ".devcontainer" / "devcontainer.json")
    config["dockerComposeFile"] = [
        str((checkout / ".devcontainer" / path).resolve()) for path in config["dockerComposeFile"]
    ] + [str(stack.override_path)]
    override_config = tmp_path / "devcontainer.json"
    override_config.write_text(json.dumps(config, indent=2))
    env = {
        **os.environ,
        "COMPOSE_PROJECT_NAME": stack.name,
        "DEBUGPY_LISTEN": f"127.0.0.1:{debug_port}",
    }
    where = ["--workspace-folder", str(checkout), "--override-config", str(override_config)]

    up = devcontainer("up", *where, env=env, timeout=1500)
    try:
        check_the_dev_container(up, stack, ports, config, where, env)
    finally:
        # The CLI's per-workspace image (your uid on the image's user), one per checkout path: not kept.
        uid_image = _uid_image(stack)
        stack.down()
        if uid_image:
            docker("rmi", uid_image, check=False)


def _uid_image(stack: Stack) -> str | None:
    try:
        image = str(stack.inspect("server")["Config"]["Image"])
    except AssertionError:
        return None
    return image if image.startswith("vsc-") else None


def check_the_dev_container(
    up: subprocess.CompletedProcess[str],
    stack: Stack,
    ports: ServerPorts,
    config: dict[str, Any],
    where: list[str],
    env: dict[str, str],
) -> None:
    assert up.returncode == 0, f"{up.stdout[-3000:]}\n{up.stderr[-5000:]}"
    outcome = json.loads(up.stdout.strip().splitlines()[-1])
    assert outcome["outcome"] == "success", outcome
    assert outcome.get("composeProjectName", stack.name) == stack.name, outcome
    assert stack.container_id("server") == outcome["containerId"] or outcome["containerId"].startswith(
        stack.container_id("server")
    )

    deadline = time.monotonic() + 240
    while True:  # the container's server (under debugpy) loads its model
        health = devcontainer(
            "exec", *where, "python", "-m", "client", "--target", ports.target, "health", env=env, timeout=120
        )
        if health.stdout.strip() == "SERVING" or time.monotonic() > deadline:
            break
        time.sleep(2)
    assert (health.returncode, health.stdout.strip()) == (0, "SERVING"), health.stderr[-2000:]
    # postCreateCommand installed the project's dev tools for the container's user.
    tools = devcontainer("exec", *where, "pytest", "--version", env=env, timeout=120)
    assert tools.returncode == 0 and "pytest" in tools.stdout + tools.stderr, tools.stderr[-2000:]
    who = devcontainer("exec", *where, "id", "-un", env=env, timeout=60)
    assert who.stdout.strip() == config["remoteUser"], who
