"""Fixtures of the cluster tests: a Kubernetes cluster, segserve deployed into it, the DNS stand-in.

`make test-cluster` runs these (SEGSERVE_CLUSTER_TESTS=1); a plain `pytest` or `make test` leaves out those
that need a cluster (deselected, not skipped: they take minutes and a root shell, and CI runs them on their
own) and runs the rest (test_stream_resume.py, test_load.py). Without
KUBECONFIG they build and start the local cluster of deploy/cluster/ (root needed) and remove it at the
end, also on failure; with KUBECONFIG they use that cluster (tests/cluster/harness.py says what it needs).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.cluster.dns import EndpointsDNS
from tests.cluster.harness import NAMESPACE, SERVICE, Cluster, endpoint_addresses, local_cluster, render, your_cluster
from tests.cluster.harness import wait_for_replicas as wait_for_replicas
from tests.cluster.images import build_image

HERE = Path(__file__).parent
ENABLE = "SEGSERVE_CLUSTER_TESTS"
NODES = int(os.environ.get("SEGSERVE_CLUSTER_NODES", "3"))
# A first run builds Kubernetes (20-30 min on two busy cores) and the image inside the first test's setup.
FIRST_BUILD_TIMEOUT_S = 4800


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "cluster: a real Kubernetes cluster (tests/cluster/; make test-cluster)")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    ours = [
        item
        for item in items
        if Path(str(item.fspath)).is_relative_to(HERE) and "cluster" in getattr(item, "fixturenames", ())
    ]
    for item in ours:
        item.add_marker(pytest.mark.cluster)
        item.add_marker(pytest.mark.timeout(FIRST_BUILD_TIMEOUT_S))
    if os.environ.get(ENABLE) != "1" and ours:
        config.hook.pytest_deselected(items=ours)
        items[:] = [item for item in items if item not in ours]


@pytest.fixture(scope="session")
def cluster() -> Iterator[Cluster]:
    if os.environ.get("KUBECONFIG"):
        yield your_cluster()
        return
    if os.geteuid() != 0:
        pytest.skip("the local cluster needs root (network namespaces, mounts, engines); or set KUBECONFIG")
    if shutil.which("docker") is None:
        pytest.skip("the local cluster needs Docker (docker.io) for the image build")
    image = build_image()
    state = Path(tempfile.mkdtemp(prefix="segserve-cluster-", dir="/var/tmp"))
    with local_cluster(NODES, [image], state) as made:
        made.env["IMAGE"] = image
        print(f"\nlocal cluster: {NODES} nodes up, with the image, in {made.env['UP_S']} s")
        yield made


@pytest.fixture(scope="session")
def image(cluster: Cluster) -> str:
    return cluster.env.get("IMAGE") or os.environ["SEGSERVE_CLUSTER_IMAGE"]


@pytest.fixture(scope="session")
def deployed(cluster: Cluster, image: str) -> Iterator[list[dict[str, object]]]:
    """segserve applied (deploy/k8s/old-clusters plus the test's changes), two replicas ready; deleted after."""
    import yaml

    docs = render(image)
    manifest = yaml.safe_dump_all(docs)
    cluster.kubectl("apply", "-f", "-", stdin=manifest)
    try:
        wait_for_replicas(cluster, 2, timeout=900)
        yield docs
    finally:
        cluster.kubectl("delete", "--ignore-not-found", "--wait=false", "-f", "-", stdin=manifest, check=False)


@pytest.fixture
def two_replicas(cluster: Cluster, deployed: object) -> Cluster:
    """Each scenario starts from two ready replicas."""
    cluster.kubectl("scale", "deployment", SERVICE, "--replicas=2")
    for node in cluster.nodes():
        cluster.kubectl("uncordon", node, check=False)
    wait_for_replicas(cluster, 2, timeout=600)
    return cluster


@pytest.fixture(scope="session")
def dns(cluster: Cluster, deployed: object) -> Iterator[EndpointsDNS]:
    name = f"{SERVICE}.{NAMESPACE}.svc.cluster.local"
    with EndpointsDNS(cluster.dns_address, name, lambda: endpoint_addresses(cluster)) as server:
        yield server


@pytest.fixture
def target(dns: EndpointsDNS) -> str:
    return dns.target(50051)
