"""The production image in a real container: healthy by its own check, serving, unprivileged, draining on stop."""

from __future__ import annotations

import re
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from PIL import Image

from client import SegmentClient
from tests.containers.compose import ServerPorts, Stack, docker, loopback_override
from tests.helpers.container_files import REPO
from tests.helpers.images import encode, photo_like


def metric_total(ports: ServerPorts, name: str) -> float:
    """The sum of a metric's samples on a server's /metrics endpoint."""
    with urllib.request.urlopen(f"http://127.0.0.1:{ports.metrics}/metrics", timeout=10) as response:
        text = response.read().decode()
    return sum(float(m.group(1)) for m in re.finditer(rf"^{name}(?:\{{[^}}]*\}})? (\S+)$", text, re.MULTILINE))


def test_production_server_serves_unprivileged_without_debugpy_and_drains_on_stop(
    images: dict[str, str], stacks: Callable[..., Stack], tmp_path: Path
) -> None:
    ports = ServerPorts()
    # Full-size default (512) so that a burst of calls is still in flight when the container is stopped.
    stack = stacks(loopback_override(images, {"server": ports}, server_env={"SEGSERVE_MAX_SIZE": "512"}))
    stack.up("server")
    stack.wait_healthy("server")  # the image's own HEALTHCHECK, on SEGSERVE_PORT
    container = stack.container_id("server")

    photo = tmp_path / "photo.jpg"
    photo_like(451, 300).save(photo, quality=90)
    segment = subprocess.run(
        [sys.executable, "-m", "client", "--target", ports.target, "segment", str(photo), "--out", str(tmp_path)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert segment.returncode == 0, segment.stderr
    with Image.open(tmp_path / "photo.mask.png") as mask:
        assert mask.size == (451, 300)

    status = docker("exec", container, "cat", "/proc/1/status").stdout
    assert re.search(r"^Uid:\s+10001\s+10001\s+10001\s+10001$", status, re.MULTILINE), status
    no_debugger = docker("exec", container, "python", "-c", "import debugpy", check=False)
    assert no_debugger.returncode == 1 and "No module named 'debugpy'" in no_debugger.stderr, no_debugger

    # `docker compose stop` while calls are in flight: every admitted call completes, the server exits 0.
    calls = 8
    finished_before = metric_total(ports, "segserve_requests_total")
    images_sent = [encode(photo_like(1280, 960, seed=i), "JPEG") for i in range(calls)]
    with SegmentClient(ports.target, timeout=180) as client, ThreadPoolExecutor(calls) as pool:
        replies = [pool.submit(client.segment, data, max_size=512) for data in images_sent]
        deadline = time.monotonic() + 60
        while True:  # until all are admitted, and some still in flight
            in_flight = metric_total(ports, "segserve_requests_in_progress")
            done = metric_total(ports, "segserve_requests_total") - finished_before
            if in_flight + done >= calls:
                break
            assert time.monotonic() < deadline, f"calls not admitted: {in_flight} in flight, {done} done"
            time.sleep(0.05)
        assert in_flight >= 1, "every call finished before the stop: nothing was tested; use bigger images"
        stack.compose("stop", "server", timeout=120)
        results = [reply.result(timeout=180) for reply in replies]
    assert [(r.width, r.height) for r in results] == [(1280, 960)] * calls
    state = stack.inspect("server")["State"]
    assert (state["Status"], state["ExitCode"]) == ("exited", 0), state


def test_three_replicas_share_the_calls_of_one_client(
    images: dict[str, str], stacks: Callable[..., Stack], tmp_path: Path
) -> None:
    """`docker compose up --scale server=3`, loopback variant: three servers on three ports, one client target."""
    replicas = {"server": ServerPorts(), "server-2": ServerPorts(), "server-3": ServerPorts()}
    stack = stacks(loopback_override(images, replicas))
    stack.up(*replicas)
    for name in replicas:
        stack.wait_healthy(name)
    target = "ipv4:" + ",".join(ports.target for ports in replicas.values())
    before = {name: metric_total(ports, "segserve_images_total") for name, ports in replicas.items()}
    with SegmentClient(target, timeout=120) as client:
        results = [client.segment(encode(photo_like(64, 48, seed=i))) for i in range(12)]
    assert all((r.width, r.height) == (64, 48) for r in results)
    served = {name: metric_total(ports, "segserve_images_total") - before[name] for name, ports in replicas.items()}
    assert sum(served.values()) == 12 and all(count >= 2 for count in served.values()), served
