"""Compose projects for the container tests: the project's own compose files plus a loopback override.

Every container runs on the host's network (`network_mode: host`, builds with `build.network: host`) and
publishes nothing (`ports: !reset []`): no bridge, no container address, every byte on 127.0.0.1. So each
server of a test listens on its own free loopback ports (SEGSERVE_PORT, SEGSERVE_METRICS_PORT).
"""

from __future__ import annotations

import json
import socket
import subprocess
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from tests.helpers.container_files import COMPOSE, COMPOSE_DEBUG, REPO, ResetList

PROJECT_PREFIX = "segserve-test-"
SERVER_IMAGE = "segserve-test-server:random"
DEBUG_IMAGE = "segserve-test-server:debug"
UI_IMAGE = "segserve-test-ui:latest"
# Small and quick: the tests judge the plumbing, never the masks (random weights).
TEST_SERVER_ENV = {
    "SEGSERVE_HOST": "127.0.0.1",
    "SEGSERVE_MAX_SIZE": "128",
    "SEGSERVE_WORKERS": "2",
    "SEGSERVE_INFERENCE_THREADS": "1",
    "SEGSERVE_LOG_LEVEL": "INFO",
}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def docker(*args: str, timeout: float = 120, check: bool = True, **kwargs: Any) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(["docker", *args], capture_output=True, text=True, timeout=timeout, check=False, **kwargs)
    if check and done.returncode != 0:
        raise AssertionError(
            f"docker {' '.join(args)} exited {done.returncode}:\n{done.stdout[-4000:]}\n{done.stderr[-4000:]}"
        )
    return done


def image_id(tag: str) -> str:
    return docker("image", "inspect", "--format", "{{.Id}}", tag).stdout.strip()


@dataclass
class ServerPorts:
    grpc: int = field(default_factory=free_port)
    metrics: int = field(default_factory=free_port)

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.grpc}"


def loopback_override(
    build_args: Mapping[str, str],
    servers: Mapping[str, ServerPorts],
    debug: bool = False,
    ui_port: int | None = None,
    server_env: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """The test-only compose file: host networking, the stand-ins' build arguments, test image tags, ports."""
    build = {"network": "host", "args": dict(build_args)}
    services: dict[str, Any] = {}
    for name, ports in servers.items():
        service: dict[str, Any] = {
            "network_mode": "host",
            "ports": ResetList(),
            "environment": {
                **TEST_SERVER_ENV,
                **(server_env or {}),
                "SEGSERVE_PORT": str(ports.grpc),
                "SEGSERVE_METRICS_PORT": str(ports.metrics),
            },
        }
        if name == "server":  # the project's own service: build it (with the stand-ins) and tag it for tests
            service |= {"image": DEBUG_IMAGE if debug else SERVER_IMAGE, "build": build}
        else:  # another replica on its own ports: the same image, started like the server service
            service |= {"image": DEBUG_IMAGE if debug else SERVER_IMAGE, "stop_grace_period": "15s"}
        services[name] = service
    first = next(iter(servers.values()))
    services["ui"] = {
        "image": UI_IMAGE,
        "build": build,
        "network_mode": "host",
        "ports": ResetList(),
        "environment": {
            "SEGSERVE_UI_HOST": "127.0.0.1",
            "SEGSERVE_UI_PORT": str(ui_port or free_port()),
            "SEGSERVE_UI_TARGET": first.target,
        },
    }
    return {"services": services}


class Stack:
    """One compose project (a unique name), brought down with its containers whatever the test's outcome."""

    def __init__(
        self,
        workdir: Path,
        override: dict[str, Any],
        debug: bool = False,
        env: Mapping[str, str] | None = None,
        project_dir: Path = REPO,
    ) -> None:
        self.name = PROJECT_PREFIX + uuid.uuid4().hex[:8]
        self.project_dir = project_dir
        self.override_path = workdir / f"{self.name}.override.yml"
        self.override_path.write_text(yaml.safe_dump(override, sort_keys=False))
        files = [project_dir / COMPOSE.name, *([project_dir / COMPOSE_DEBUG.name] if debug else []), self.override_path]
        self.files = files
        self.env = dict(env or {})

    def compose_args(self) -> list[str]:
        args = ["compose", "--project-name", self.name, "--project-directory", str(self.project_dir)]
        for path in self.files:
            args += ["-f", str(path)]
        return args

    def compose(self, *args: str, timeout: float = 300, check: bool = True) -> subprocess.CompletedProcess[str]:
        import os

        return docker(*self.compose_args(), *args, timeout=timeout, check=check, env={**os.environ, **self.env})

    def up(self, *services: str) -> None:
        self.compose("up", "--detach", "--no-build", "--pull", "never", *services, timeout=300)

    def container_id(self, service: str) -> str:
        ids = self.compose("ps", "--all", "--quiet", service).stdout.split()
        assert len(ids) == 1, f"{service}: containers {ids}"
        return ids[0]

    def inspect(self, service: str) -> dict[str, Any]:
        data = json.loads(docker("inspect", self.container_id(service)).stdout)
        return data[0]  # type: ignore[no-any-return]

    def wait_healthy(self, service: str, timeout: float = 240) -> None:
        deadline = time.monotonic() + timeout
        state: dict[str, Any] = {}
        while time.monotonic() < deadline:
            state = self.inspect(service)["State"]
            if state.get("Health", {}).get("Status") == "healthy":
                return
            assert state["Status"] in ("created", "running"), f"{service} stopped: {state}\n{self.logs(service)}"
            time.sleep(1)
        raise AssertionError(
            f"{service} not healthy after {timeout:.0f} s: {state.get('Health')}\n{self.logs(service)}"
        )

    def logs(self, *services: str) -> str:
        return self.compose("logs", "--no-color", "--timestamps", *services, check=False, timeout=60).stdout[-6000:]

    def down(self) -> None:
        self.compose("down", "--volumes", "--remove-orphans", "--timeout", "5", check=False, timeout=180)


def remove_test_containers() -> list[str]:
    """Every container of a test project still there (a test killed half-way): removed; returns their names."""
    listed = docker(
        "ps",
        "--all",
        "--filter",
        "label=com.docker.compose.project",
        "--format",
        '{{.ID}} {{.Label "com.docker.compose.project"}} {{.Names}}',
        check=False,
    ).stdout
    leftovers = [
        line.split() for line in listed.splitlines() if line.split()[1:2] and line.split()[1].startswith(PROJECT_PREFIX)
    ]
    if leftovers:
        docker("rm", "--force", "--volumes", *[row[0] for row in leftovers], check=False, timeout=120)
    return [row[2] for row in leftovers]


def build_images(workdir: Path, build_args: Mapping[str, str], services: Sequence[str], debug: bool) -> None:
    """`docker compose build` of the project's services with the stand-ins, tagged for the tests."""
    override = loopback_override(build_args, {"server": ServerPorts()}, debug=debug)
    stack = Stack(workdir, override, debug=debug, env={"DOCKER_BUILDKIT": "1"})
    stack.compose("build", *services, timeout=3000)
