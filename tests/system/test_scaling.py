"""Scale-out on one machine: replicas as `python -m server` processes, balanced per call by the client.

Replicas listen on the same port of different loopback addresses (127.0.0.1, .2, .3, ...), the way
pods of a headless Service share a port on different IPs. A target names them as an `ipv4:` list,
or as a `dns://` name answered by a tiny DNS server in this file, so that a replica can join the
name's answer late, as a new pod joins once ready. Each replica counts the images it served
(GetModelInfo.batch_sizes, asked of that replica alone), so the spread is measured where it lands.
"""

from __future__ import annotations

import io
import os
import re
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2
from PIL import Image

from client import AsyncSegmentClient, SegmentClient, SegmentError
from client.channel import HEALTH_SERVICE, channel_options
from tests.helpers.images import encode, photo_like
from tests.helpers.servers import ServerThread, make_settings

ROOT = Path(__file__).resolve().parents[2]
HOSTS = ("127.0.0.1", "127.0.0.2", "127.0.0.3")
LATE_HOST = "127.0.0.4"
CONNECTION_AGE_S = 2.0
IMAGE = encode(photo_like(48, 40), "PNG")
# Noise does not compress: about 1.4 MB, over gRPC's default 256 KiB retry buffer (see client/channel.py).
LARGE_IMAGE = encode(Image.fromarray(np.random.default_rng(0).integers(0, 255, (700, 700, 3), dtype=np.uint8)), "PNG")


def loopback_aliases_work() -> bool:
    """Linux routes all of 127.0.0.0/8 to loopback; some systems (macOS) only 127.0.0.1."""
    try:
        with socket.socket() as probe:
            probe.bind((LATE_HOST, 0))
    except OSError:
        return False
    return True


pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not loopback_aliases_work(), reason="127.0.0.2-4 cannot be bound here"),
]


@dataclass
class Replica:
    host: str
    port: int
    process: subprocess.Popen[bytes]
    log: Path

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def images_served(self) -> int:
        """Asked of this replica alone: GetModelInfo.batch_sizes[i] counts its batches of i + 1 images."""
        with SegmentClient(self.address, timeout=10) as direct:
            sizes = direct.model_info().batch_sizes
        return sum((i + 1) * n for i, n in enumerate(sizes))

    def log_tail(self) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-20:])


def shared_free_port(hosts: tuple[str, ...]) -> int:
    """A port free on every one of the loopback addresses."""
    for _ in range(50):
        with socket.socket() as probe:
            probe.bind((hosts[0], 0))
            port = int(probe.getsockname()[1])
        try:
            for host in hosts:
                with socket.socket() as other:
                    other.bind((host, port))
        except OSError:
            continue
        return port
    raise RuntimeError("no port free on all loopback addresses")


def start_replica(host: str, port: int, log_dir: Path) -> Replica:
    log = log_dir / f"replica-{host}.log"
    flags = {
        "host": host,
        "port": port,
        "weights": "random",
        "device": "cpu",
        "max-size": 64,
        "inference-threads": 1,  # three replicas share two cores
        "workers": 1,
        "grace-period-s": 5,
        "max-connection-age-s": CONNECTION_AGE_S,
        "max-connection-age-grace-s": 5,
        "metrics-port": 0,  # a free port each: replicas must not compete for 9464
    }
    args = [item for name, value in flags.items() for item in (f"--{name}", str(value))]
    with log.open("wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "server", *args],
            cwd=ROOT,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    return Replica(host, port, process, log)


def wait_serving(replica: Replica, timeout: float = 90) -> None:
    with SegmentClient(replica.address) as direct:
        try:
            direct.wait_until_serving(timeout)
        except SegmentError as exc:
            raise AssertionError(f"{replica.address} not serving: {exc}\n{replica.log_tail()}") from None


def stop_replica(replica: Replica) -> None:
    if replica.process.poll() is None:
        replica.process.send_signal(signal.SIGTERM)
        try:
            replica.process.wait(15)
        except subprocess.TimeoutExpired:
            replica.process.kill()
            replica.process.wait()


class TinyDns:
    """Answers A queries for any name with `addresses`, which a test may change; nothing else."""

    def __init__(self) -> None:
        self.addresses: list[str] = []
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.settimeout(0.2)
        self.port = int(self.sock.getsockname()[1])
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True, name="tiny-dns")
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                query, peer = self.sock.recvfrom(512)
            except OSError:
                continue
            self.sock.sendto(self._answer(query), peer)

    def _answer(self, query: bytes) -> bytes:
        end = 12
        while query[end]:  # the question's name: length-prefixed labels, then a zero byte
            end += 1 + query[end]
        end += 5  # zero byte, type, class
        qtype = struct.unpack(">H", query[end - 4 : end - 2])[0]
        addresses = list(self.addresses) if qtype == 1 else []  # AAAA and others: no records
        header = query[:2] + struct.pack(">HHHHH", 0x8180, 1, len(addresses), 0, 0)
        records = b"".join(
            struct.pack(">HHHIH", 0xC00C, 1, 1, 0, 4) + socket.inet_aton(address) for address in addresses
        )
        return header + query[12:end] + records

    def close(self) -> None:
        self._stop.set()
        self._thread.join(2)
        self.sock.close()


@pytest.fixture(scope="module")
def replicas(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[Replica]]:
    log_dir = tmp_path_factory.mktemp("replicas")
    port = shared_free_port((*HOSTS, LATE_HOST))
    started = [start_replica(host, port, log_dir) for host in HOSTS]  # in parallel: each loads torch
    try:
        for replica in started:
            wait_serving(replica)
        yield started
    finally:
        for replica in started:
            stop_replica(replica)


def ipv4_target(replicas: list[Replica]) -> str:
    return "ipv4:" + ",".join(r.address for r in replicas)


def served(replicas: list[Replica]) -> list[int]:
    return [r.images_served() if r.process.poll() is None else 0 for r in replicas]


def segment_all(client: SegmentClient, count: int, concurrency: int = 1, image: bytes = IMAGE) -> list[str]:
    """Sends `count` Segment calls; returns what went wrong (empty when every call succeeded)."""
    size = Image.open(io.BytesIO(image)).size

    def one(i: int) -> str | None:
        try:
            result = client.segment(image, image_id=f"img-{i}")
        except SegmentError as exc:
            return f"img-{i}: {exc}"
        return None if result.mask.shape == size[::-1] else f"img-{i}: mask {result.mask.shape}"

    with ThreadPoolExecutor(concurrency) as pool:
        return [error for error in pool.map(one, range(count)) if error]


def test_calls_spread_over_every_replica(replicas: list[Replica]) -> None:
    before = served(replicas)
    with SegmentClient(ipv4_target(replicas), timeout=30) as client:
        assert segment_all(client, 60) == []
    shares = [after - b for after, b in zip(served(replicas), before, strict=True)]
    assert sum(shares) == 60, shares
    assert all(share >= 0.2 * 60 for share in shares), f"images per replica {shares}"


async def test_async_client_spreads_too(replicas: list[Replica]) -> None:
    before = served(replicas)
    async with AsyncSegmentClient(ipv4_target(replicas), timeout=30) as client:
        for i in range(30):
            await client.segment(IMAGE, image_id=f"async-{i}")
    shares = [after - b for after, b in zip(served(replicas), before, strict=True)]
    assert sum(shares) == 30 and all(share >= 0.2 * 30 for share in shares), f"images per replica {shares}"


def test_cli_accepts_a_multi_address_target(replicas: list[Replica], tmp_path: Path) -> None:
    images = [tmp_path / "a.png", tmp_path / "b.png"]
    for image in images:
        image.write_bytes(IMAGE)
    out = str(tmp_path / "out")
    before = served(replicas)
    done = subprocess.run(
        [sys.executable, "-m", "client", "--target", ipv4_target(replicas), "segment", *map(str, images), "--out", out],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "out" / "a.mask.png").is_file() and (tmp_path / "out" / "b.mask.png").is_file()
    # SegmentStream is one call, so both images go to one replica; what counts is that it got there.
    assert sum(served(replicas)) - sum(before) == 2


def test_killed_replica_costs_no_request(replicas: list[Replica]) -> None:
    victim = replicas[2]
    with SegmentClient(ipv4_target(replicas), timeout=30) as client:
        assert segment_all(client, 12, concurrency=3) == []
        # SIGKILL (no draining: calls in flight are cut) only while the victim holds calls.
        with once_busy(victim, victim.process.kill) as killed:
            # Large images: calls stay in flight longer, and are retried only thanks to the client's retry buffer.
            errors = segment_all(client, 40, concurrency=3, image=LARGE_IMAGE)
    assert killed.is_set(), "the victim never held a call, so nothing was cut"
    assert victim.process.wait(10) == -signal.SIGKILL
    assert errors == [], errors


def test_late_replica_gets_traffic_once_connections_age(replicas: list[Replica], tmp_path: Path) -> None:
    """A resolver answer that grows is only seen when connections close: max connection age does that."""
    first = [r for r in replicas if r.process.poll() is None][:2]
    dns = TinyDns()
    dns.addresses = [r.host for r in first]
    target = f"dns://127.0.0.1:{dns.port}/replicas.segserve.test:{first[0].port}"
    # A fresh resolution may follow a closed connection at once (gRPC's default waits up to 30 s).
    options = [*channel_options(), ("grpc.dns_min_time_between_resolutions_ms", 100)]
    late: Replica | None = None
    try:
        with SegmentClient(target, timeout=30, channel=grpc.insecure_channel(target, options=options)) as client:
            assert segment_all(client, 6) == []
            late = start_replica(LATE_HOST, first[0].port, tmp_path)
            wait_serving(late)
            assert late.images_served() == 0
            dns.addresses.append(LATE_HOST)  # ready: now in the name's answer, as a ready pod would be
            joined = time.monotonic()
            errors: list[str] = []
            while late.images_served() == 0 and time.monotonic() - joined < 6 * CONNECTION_AGE_S:
                errors += segment_all(client, 3)
            waited = time.monotonic() - joined
            assert late.images_served() > 0, f"no traffic {waited:.1f}s after joining\n{late.log_tail()}"
            before = late.images_served()
            errors += segment_all(client, 30)
            assert errors == []
            assert late.images_served() - before >= 0.2 * 30
    finally:
        dns.close()
        if late is not None:
            stop_replica(late)


def metrics_url(replica: Replica) -> str:
    found = re.search(r"metrics on (http://\S+/metrics)", replica.log.read_text(errors="replace"))
    assert found, replica.log_tail()
    return found[1]


def queue_depth(url: str) -> float:
    """segserve_queue_depth: requests the replica has admitted and not yet answered."""
    no_proxy = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with no_proxy.open(url, timeout=5) as response:
        text = response.read().decode()
    found = re.search(r"^segserve_queue_depth (\S+)$", text, re.MULTILINE)
    assert found, text[:500]
    return float(found[1])


@contextmanager
def once_busy(victim: Replica, act: Callable[[], None]) -> Iterator[threading.Event]:
    """Runs `act` once, the first time the victim holds admitted requests, while the block runs; the event
    yielded says whether it did."""
    url = metrics_url(victim)
    done, acted = threading.Event(), threading.Event()

    def watch() -> None:
        while not done.is_set():
            if queue_depth(url) > 0:
                act()
                acted.set()
                return

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        yield acted
    finally:
        done.set()
        watcher.join(10)


def test_draining_replica_costs_no_request(replicas: list[Replica]) -> None:
    """SIGTERM: the replica says NOT_SERVING, sends GOAWAY and finishes what it has; clients move on."""
    alive = [r for r in replicas if r.process.poll() is None]
    assert len(alive) >= 2
    victim = alive[0]
    with SegmentClient(ipv4_target(alive), timeout=30) as client:
        assert segment_all(client, 6, concurrency=2) == []
        # SIGTERM only while the victim holds requests, so that draining has something to finish.
        with once_busy(victim, lambda: victim.process.send_signal(signal.SIGTERM)) as signalled:
            # Large images: each call stays in flight long enough for the signal to land inside one.
            errors = segment_all(client, 60, concurrency=3, image=LARGE_IMAGE)
    assert signalled.is_set(), "the replica never held a request"
    assert victim.process.wait(15) == 0, victim.log_tail()
    assert errors == [], errors
    # The replica counts what it held when the signal arrived: a drain with nothing to finish proves nothing.
    found = re.search(r"SIGTERM received; requests in flight: (\d+)", victim.log.read_text(errors="replace"))
    assert found, f"SIGTERM never reached the replica\n{victim.log_tail()}"
    assert int(found[1]) > 0, victim.log_tail()


# ---- client-side health checking: a replica that says NOT_SERVING gets no calls ---------------------------


def images_through(server: ServerThread) -> int:
    return sum(size * count for size, count in enumerate(server.app.pipeline.batch_size_counts, start=1))


def set_health(server: ServerThread, status: health_pb2.HealthCheckResponse.ServingStatus.ValueType) -> None:
    server.call(server.app.health.set(HEALTH_SERVICE, status))


def test_the_client_sends_nothing_to_a_replica_that_says_not_serving() -> None:
    """A draining replica says NOT_SERVING before anything else; the client must stop picking it then,
    not only once its listener closes, or calls keep landing on it until the very end of the drain."""
    first, second = ServerThread(make_settings()), ServerThread(make_settings())
    try:
        set_health(first, health_pb2.HealthCheckResponse.NOT_SERVING)
        with SegmentClient(f"ipv4:{first.target},{second.target}", timeout=30) as client:
            for i in range(12):
                client.segment(IMAGE, image_id=f"img-{i}")
            assert images_through(first) == 0
            assert images_through(second) == 12
            set_health(second, health_pb2.HealthCheckResponse.NOT_SERVING)
            set_health(first, health_pb2.HealthCheckResponse.SERVING)
            # Health watches carry the change in their own time: call until a call lands on `first`, then
            # every call must (second says NOT_SERVING).
            deadline = time.monotonic() + 30
            while images_through(first) == 0:
                assert time.monotonic() < deadline, "the client never went back to the replica now serving"
                client.segment(IMAGE, image_id="probe")
            before = images_through(first)
            for i in range(6):
                client.segment(IMAGE, image_id=f"back-{i}")
            assert images_through(first) - before == 6
            set_health(first, health_pb2.HealthCheckResponse.NOT_SERVING)
            refused = refusal_once_none_serves(client)
    finally:
        first.stop()
        second.stop()
    assert refused.code == grpc.StatusCode.UNAVAILABLE
    assert "no replica is serving" in refused.message, refused.message


def refusal_once_none_serves(client: SegmentClient) -> SegmentError:
    """The error a call gets once the client has seen that no replica serves (calls before that may still land)."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            client.segment(IMAGE, image_id="after-all-stopped")
        except SegmentError as exc:
            return exc
    raise AssertionError("calls kept landing although no replica says SERVING")
