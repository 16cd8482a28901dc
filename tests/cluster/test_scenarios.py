"""segserve on a real cluster under load: readiness, spread, scaling, a rolling update, a drain, a lost node.

Every scenario runs a closed loop of Segment, SegmentUpload, SegmentStream and video calls through the
project's client (round_robin, retries, stream resume) on the Service's name, counts every call by
outcome, prints the counts and the time until the cluster had its replicas back, and fails on any call
lost. The scenarios run in this order on one deployment; the lost node comes last (it stays lost).
"""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest

from client import SegmentClient, SegmentError
from tests.cluster.harness import (
    CONNECTION_AGE_S,
    SERVICE,
    Cluster,
    PodWatch,
    endpoint_addresses,
    metric_total,
    pods,
    wait_for_replicas,
)
from tests.cluster.load import SMALL, Counts, Load, resumes_counted, wait_until

REPORT = Path(os.environ.get("SEGSERVE_CLUSTER_REPORT", "/var/tmp/segserve-cluster-report.json"))
HEALTH_SERVICE = "segserve.v1.Segmenter"
# gRPC's DNS resolver waits at least this long between two resolutions (docs/scaling.md).
DNS_MIN_INTERVAL_S = 30
GRACE_S = 30  # the base's terminationGracePeriodSeconds


def report(scenario: str, counts: Counts, back_s: float, **extra: Any) -> None:
    """Prints the scenario's counts and adds them to the report file (docs/scaling.md quotes it)."""
    line = f"[{scenario}] {counts.summary()}; replicas back after {back_s:.1f} s"
    if extra:
        line += "; " + ", ".join(f"{k} {v}" for k, v in extra.items())
    print("\n" + line)
    for error in counts.errors[:5]:
        print(f"  {error}")
    data = json.loads(REPORT.read_text()) if REPORT.is_file() else {}
    data[scenario] = {
        "sent": counts.sent(),
        "by_outcome": {f"{k}:{o}": n for (k, o), n in sorted(counts.outcomes.items())},
        "failed": counts.failed(),
        "streams_resumed": counts.resumed,
        "replicas_back_s": round(back_s, 1),
        **extra,
        "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    REPORT.write_text(json.dumps(data, indent=2) + "\n")


def assert_nothing_lost(counts: Counts) -> None:
    assert counts.sent() > 0, "no call was made"
    for kind in ("segment", "upload", "stream", "video"):
        assert counts.sent(kind) > 0, f"no {kind} call completed during the scenario: {counts.summary()}"
    assert not counts.failed(), f"calls lost: {counts.summary()}\n" + "\n".join(counts.errors)


def health(ip: str, service: str = HEALTH_SERVICE) -> str:
    with SegmentClient(f"ipv4:{ip}:50051", timeout=5) as client:
        try:
            return client.health(service, timeout=3)
        except SegmentError as exc:
            return exc.code.name


def served(ips: list[str]) -> dict[str, float]:
    return {ip: metric_total(ip, "segserve_images_total") for ip in ips}


def test_replicas_take_calls_only_when_serving_and_calls_spread(two_replicas: Cluster, target: str) -> None:
    ready = endpoint_addresses(two_replicas)
    assert len(ready) == 2
    assert {ip: health(ip) for ip in ready} == {ip: "SERVING" for ip in ready}
    before = served(ready)
    with SegmentClient(target, timeout=60) as client:
        for n in range(40):
            client.segment(SMALL[n % len(SMALL)])
    spread = {ip: served([ip])[ip] - before[ip] for ip in ready}
    print(f"\n[spread] 40 calls over 2 replicas: {spread}")
    assert sum(spread.values()) == 40 and min(spread.values()) >= 12, spread


def test_scale_2_to_3_and_back_under_load(two_replicas: Cluster, target: str) -> None:
    cluster = two_replicas
    old = {p.ip for p in pods(cluster)}
    published_unready: list[tuple[str, str]] = []
    with Load(target) as load:
        time.sleep(5)
        started = time.monotonic()
        cluster.kubectl("scale", "deployment", SERVICE, "--replicas=3")

        def new_pod_published() -> bool:
            # Each moment the new pod is in the Service's answer, it must say SERVING.
            new = [ip for ip in endpoint_addresses(cluster) if ip not in old]
            for ip in new:
                status = health(ip)
                if status != "SERVING":
                    published_unready.append((ip, status))
            return bool(new)

        wait_until(new_pod_published, 600, "the third replica in the Service", every=0.3)
        wait_for_replicas(cluster, 3)
        up_s = time.monotonic() - started
        published = time.monotonic()
        new_ip = next(ip for ip in endpoint_addresses(cluster) if ip not in old)
        baseline = served([new_ip])[new_ip]
        limit = CONNECTION_AGE_S * 1.1 + DNS_MIN_INTERVAL_S + 15
        wait_until(lambda: served([new_ip])[new_ip] > baseline, limit, "the new replica's first call")
        first_call_s = time.monotonic() - published
        time.sleep(5)
        cluster.kubectl("scale", "deployment", SERVICE, "--replicas=2")
        down_started = time.monotonic()
        down_s = wait_for_replicas(cluster, 2)
        time.sleep(3)
    counts = load.counts
    report(
        "scale 2->3->2",
        counts,
        up_s,
        new_replica_first_call_s=round(first_call_s, 1),
        scale_down_s=round(down_s, 1),
        scale_down_started_after_s=round(down_started - started, 1),
    )
    assert not published_unready, f"the Service published a replica that was not SERVING: {published_unready}"
    assert_nothing_lost(counts)


def test_rolling_update_under_load(two_replicas: Cluster, target: str) -> None:
    cluster = two_replicas
    old = {p.name for p in pods(cluster)}
    watch = PodWatch(cluster)
    level = "WARNING" if "INFO" in cluster.kubectl("get", "deployment", SERVICE, "-o", "yaml") else "INFO"
    with Load(target) as load:
        time.sleep(5)
        cluster.kubectl("set", "env", f"deployment/{SERVICE}", f"SEGSERVE_LOG_LEVEL={level}")
        back_s = wait_for_replicas(cluster, 2, timeout=900)
        # the old pods' final status reaches the watch shortly after they are gone from the list
        wait_until(lambda: old <= set(watch.exits), 60, "the old pods' exit status")
        time.sleep(3)
    exits = watch.stop()
    counts = load.counts
    report("rolling update", counts, back_s, old_pods_exit_codes=sorted(exits[name].exit_code for name in old))
    time.sleep(2)  # the log of a container that did not exit 0, fetched as its exit was seen
    for name in old:
        assert exits[name].exit_code == 0, f"{name} exited {exits[name]}\n{watch.logs.get(name)}"
    assert_nothing_lost(counts)


def test_drain_a_node_under_load(two_replicas: Cluster, target: str) -> None:
    cluster = two_replicas
    pdb = cluster.get("pdb", SERVICE)
    assert pdb["spec"]["maxUnavailable"] == 1 and pdb["status"]["disruptionsAllowed"] == 1, pdb
    node = pods(cluster)[0].node
    on_node = sum(p.node == node for p in pods(cluster))
    with Load(target) as load:
        time.sleep(5)
        started = time.monotonic()
        cluster.kubectl("drain", node, "--ignore-daemonsets", "--delete-emptydir-data", "--timeout=300s", timeout=400)
        back_s = wait_for_replicas(cluster, 2)
        assert node not in {p.node for p in pods(cluster)}
        time.sleep(3)
    cluster.kubectl("uncordon", node)
    counts = load.counts
    report(
        "drain", counts, back_s, drained_node=node, replicas_on_it=on_node, drain_s=round(time.monotonic() - started, 1)
    )
    assert_nothing_lost(counts)


def endless_frames(stop: threading.Event) -> Any:
    rng = np.random.default_rng(7)
    frame = rng.integers(0, 255, (48, 64, 3), dtype=np.uint8)
    while not stop.is_set():
        yield frame


def test_a_node_lost_under_load(two_replicas: Cluster, target: str) -> None:
    cluster = two_replicas
    if not cluster.can_lose_nodes:
        pytest.skip("this cluster cannot lose a node on demand (set SEGSERVE_CLUSTER_KILL_NODE)")
    victim, survivor = sorted(pods(cluster), key=lambda p: p.name)
    pair = f"ipv4:{victim.ip}:50051,{survivor.ip}:50051"
    stop = threading.Event()
    outcomes: dict[str, Any] = {}

    def video(name: str, client_target: str, resumes: int) -> None:
        with SegmentClient(client_target, timeout=300, stream_resumes=resumes) as client:
            indices = []
            try:
                for frame in client.segment_frames(endless_frames(stop), window=4):
                    assert frame.ok, frame.error
                    indices.append(frame.index)
                outcomes[name] = ("ok", indices == list(range(len(indices))), len(indices))
            except SegmentError as exc:
                outcomes[name] = (exc.code.name, indices == list(range(len(indices))), len(indices))

    # Two long videos on one client over both replicas: round robin puts one on each, so one is on the victim.
    with SegmentClient(pair, timeout=30) as warm:
        for n in range(4):
            warm.segment(SMALL[n])
    videos = [threading.Thread(target=video, args=(f"resumed-{n}", pair, 3), daemon=True) for n in range(2)] + [
        threading.Thread(target=video, args=("pinned-no-resume", f"ipv4:{victim.ip}:50051", 0), daemon=True)
    ]
    # The videos here run in this process (the Load's calls in its child, counted there): both counted.
    with (
        resumes_counted() as own_resumes,
        Load(target, kinds=("segment", "upload", "stream", "video", "video")) as load,
    ):
        for thread in videos:
            thread.start()
        time.sleep(8)
        cluster.kill_node(victim.node)
        back_s = wait_for_replicas(cluster, 2, timeout=300, lost_nodes=frozenset({victim.node}))
        time.sleep(5)
        stop.set()
        for thread in videos:
            thread.join(timeout=120)
    counts = load.counts
    report(
        "lost node",
        counts,
        back_s,
        lost_node=victim.node,
        videos={k: list(v) for k, v in outcomes.items()},
        videos_resumed=own_resumes.count,
    )
    # Without resume the stream on the lost node fails as gRPC ends it: what the resume is for.
    assert outcomes["pinned-no-resume"][0] == grpc.StatusCode.UNAVAILABLE.name, outcomes
    for n in range(2):
        state, in_order, frames = outcomes[f"resumed-{n}"]
        assert (state, in_order) == ("ok", True) and frames > 0, outcomes
    resumed = own_resumes.count + counts.resumed
    assert resumed >= 1, (
        f"no stream was resumed (videos here {own_resumes.count}, load {counts.resumed}): the lost node served none"
    )
    assert_nothing_lost(counts)
