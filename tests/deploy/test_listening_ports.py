"""Where the containers listen: debugpy on loopback only, and every port the server opens declared.

debugpy runs any code sent to its port, so the debug image and the debug overlay keep it on loopback, where
only the developer reaches it (issue 40, point 10). The server's own ports (server/settings.py: every field
named port or *_port) are declared by the image's EXPOSE and the Deployment's containerPorts, so a deployer
sees each port that is open (point 11). Static checks of the files; tests/containers/ runs them for real.
"""

from __future__ import annotations

import ipaddress
import json
import shlex
import shutil
import subprocess
from collections.abc import Mapping
from typing import Any

import pytest
import yaml

from server.settings import Settings
from tests.helpers.container_files import (
    COMPOSE,
    COMPOSE_DEBUG,
    REPO,
    ResetList,
    command_args,
    compose_service,
    compose_v2,
    debug_launch_config,
    dockerfile_stages,
)

DEPLOYMENT = REPO / "deploy" / "k8s" / "base" / "deployment.yaml"
SERVICE = REPO / "deploy" / "k8s" / "base" / "service.yaml"
PORT_SETTINGS = [name for name in Settings.model_fields if name == "port" or name.endswith("_port")]


def is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a name (even localhost) may resolve elsewhere; the files name the address


def debugpy_listen(argv: list[str]) -> tuple[str, int]:
    """`--listen [HOST:]PORT` of a debugpy command line (debugpy's own default host is 127.0.0.1)."""
    assert "debugpy" in argv and "--listen" in argv, argv
    host, _, port = argv[argv.index("--listen") + 1].rpartition(":")
    return host or "127.0.0.1", int(port)


def last_instruction(stage: list[str], keyword: str) -> str:
    lines = [line for line in stage if line.split(maxsplit=1)[0].upper() == keyword]
    assert lines, f"no {keyword} in {stage[0]}"
    return lines[-1].split(maxsplit=1)[1]


def stage_chain(name: str) -> list[list[str]]:
    """A Dockerfile stage and the stages it is built FROM, base first (EXPOSE and ENV are inherited)."""
    stages = dockerfile_stages()
    chain = [stages[name]]
    while (parent := chain[0][0].split()[1]) in stages:
        chain.insert(0, stages[parent])
    return chain


def exposed_ports(stages: list[list[str]]) -> set[int]:
    return {
        int(port.split("/")[0])
        for stage in stages
        for line in stage
        if line.upper().startswith("EXPOSE ")
        for port in line.split()[1:]
    }


def image_env(name: str) -> dict[str, str]:
    """The ENV of a stage and its parents (`ENV A=1 B=2`, the form this Dockerfile uses)."""
    env: dict[str, str] = {}
    for stage in stage_chain(name):
        for line in stage:
            if line.upper().startswith("ENV "):
                env |= dict(item.split("=", 1) for item in shlex.split(line.split(maxsplit=1)[1]))
    return env


def ports_the_server_opens(env: Mapping[str, str]) -> set[int]:
    """The ports a server started with `env` listens on: each port setting, its default unless set; 0 (a free
    port, chosen at start) and -1 (off) declare nothing."""
    ports = set()
    for name in PORT_SETTINGS:
        value = int(env.get(f"SEGSERVE_{name.upper()}", Settings.model_fields[name].default))
        if value > 0:
            ports.add(value)
    return ports


def published_host_ips(base: Mapping[str, Any], overlay: Mapping[str, Any]) -> list[str]:
    """The host address of every port a service publishes once the overlay is merged in ('' = every one)."""
    overlay_ports = overlay.get("ports", [])
    merged = overlay_ports if isinstance(overlay_ports, ResetList) else [*base.get("ports", []), *overlay_ports]
    addresses = []
    for port in merged:
        if isinstance(port, dict):
            addresses.append(str(port.get("host_ip", "")))
        else:
            parts = str(port).rsplit("/", 1)[0].split(":")
            addresses.append(":".join(parts[:-2]) if len(parts) >= 3 else "")
    return addresses


# ---- point 10: debugpy where only the developer reaches it -------------------------------------------------


def test_the_debug_image_runs_debugpy_on_loopback() -> None:
    argv = json.loads(last_instruction(dockerfile_stages()["debug"], "CMD"))
    host, _ = debugpy_listen(argv)
    assert is_loopback(host), f"the debug image's debugpy listens on {host}: remote code execution beyond loopback"


def test_no_stage_exposes_the_debug_port() -> None:
    """`docker run -P` publishes every EXPOSEd port on all of the host's interfaces."""
    _, debug_port = debugpy_listen(json.loads(last_instruction(dockerfile_stages()["debug"], "CMD")))
    for name in dockerfile_stages():
        assert debug_port not in exposed_ports(stage_chain(name)), f"stage {name} EXPOSEs debugpy's {debug_port}"
    assert exposed_ports(stage_chain("debug")) == exposed_ports(stage_chain("server"))


@pytest.mark.parametrize("env", [{}, {"DEBUGPY_WAIT": "1"}])
def test_the_debug_overlay_keeps_debugpy_and_every_port_on_the_hosts_loopback(env: dict[str, str]) -> None:
    server = compose_service(COMPOSE_DEBUG, "server", env)
    host, _ = debugpy_listen(command_args(server["command"]))
    assert is_loopback(host), f"the debug overlay's debugpy listens on {host}: reachable beyond the developer"
    # On loopback inside the container, a debugger outside reaches it only on the host's network, where the
    # container's loopback is the host's; there the image's 0.0.0.0 would put the server on every host
    # interface, so the overlay binds it (and the page) to loopback too.
    assert server.get("network_mode") == "host", "debugpy on the container's loopback: no debugger can attach"
    assert is_loopback(server["environment"]["SEGSERVE_HOST"])
    ui = compose_service(COMPOSE_DEBUG, "ui", env)
    assert ui.get("network_mode") == "host", "the page must reach the server on the host's loopback"
    assert is_loopback(ui["environment"]["SEGSERVE_UI_HOST"])
    assert is_loopback(ui["environment"]["SEGSERVE_UI_TARGET"].removeprefix("ipv4:").rpartition(":")[0])
    for name in ("server", "ui"):
        addresses = published_host_ips(compose_service(COMPOSE, name, env), compose_service(COMPOSE_DEBUG, name, env))
        assert all(is_loopback(a) for a in addresses), f"{name} publishes on {addresses} under the debug overlay"


def test_compose_merges_the_debug_overlay_onto_the_hosts_loopback() -> None:
    """The same, as Compose itself merges the two files (its !reset included)."""
    command = compose_v2()
    if command is None:
        pytest.skip("no Docker Compose v2 installed (the file check above still ran)")
    merged = subprocess.run(
        [*command, "-f", str(COMPOSE), "-f", str(COMPOSE_DEBUG), "config", "--format", "json"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert merged.returncode == 0, merged.stderr
    services = json.loads(merged.stdout)["services"]
    for name, service in services.items():
        assert service.get("network_mode") == "host", name
        assert not service.get("ports"), f"{name} publishes {service['ports']} under the debug overlay"
    host, _ = debugpy_listen(services["server"]["command"])
    assert is_loopback(host) and is_loopback(services["server"]["environment"]["SEGSERVE_HOST"])


def test_vs_code_attaches_where_debugpy_listens() -> None:
    """launch.json's attach, the overlay (so the dev container), the debug image and `make debug` agree."""
    connect = debug_launch_config()["connect"]
    attach = (connect["host"], connect["port"])
    assert is_loopback(attach[0])
    assert debugpy_listen(command_args(compose_service(COMPOSE_DEBUG, "server")["command"])) == attach
    assert debugpy_listen(json.loads(last_instruction(dockerfile_stages()["debug"], "CMD"))) == attach
    if shutil.which("make") is not None:
        dry_run = subprocess.run(["make", "-n", "debug"], cwd=REPO, capture_output=True, text=True, timeout=30)
        assert dry_run.returncode == 0, dry_run.stderr
        (line,) = [line for line in dry_run.stdout.replace("\\\n", " ").splitlines() if "-m debugpy" in line]
        assert debugpy_listen(shlex.split(line)) == attach


# ---- point 11: every port the server opens is declared -------------------------------------------------


def test_the_image_exposes_every_port_the_server_opens() -> None:
    opened = ports_the_server_opens(image_env("server"))
    assert len(opened) == len(PORT_SETTINGS) == 3, opened  # gRPC, HTTP and metrics, all on by default
    assert exposed_ports(stage_chain("server")) == opened


def test_the_deployment_declares_every_port_the_server_opens() -> None:
    deployment = yaml.safe_load(DEPLOYMENT.read_text())
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    env = {item["name"]: item["value"] for item in container.get("env", [])}
    declared = {p["containerPort"] for p in container["ports"]}
    assert declared == ports_the_server_opens(env) == exposed_ports(stage_chain("server"))
    names = {p["name"]: p["containerPort"] for p in container["ports"]}
    # The Service's ports name container ports that exist (a targetPort by name that matches none routes nowhere).
    for port in yaml.safe_load(SERVICE.read_text())["spec"]["ports"]:
        assert names.get(port["targetPort"]) == port["port"], port


def test_the_port_checks_see_a_port_turned_off_or_moved() -> None:
    defaults = ports_the_server_opens({})
    assert ports_the_server_opens({"SEGSERVE_HTTP_PORT": "-1"}) == defaults - {8000}
    assert ports_the_server_opens({"SEGSERVE_METRICS_PORT": "9100"}) == defaults - {9464} | {9100}
    assert not is_loopback("0.0.0.0") and not is_loopback("localhost") and is_loopback("[::1]")
    assert published_host_ips({"ports": ["50051-50053:50051"]}, {"ports": ["127.0.0.1:5678:5678"]}) == [
        "",
        "127.0.0.1",
    ]
    assert published_host_ips({"ports": ["50051:50051"]}, {"ports": ResetList()}) == []
