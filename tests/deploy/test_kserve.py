"""deploy/kserve: the ServingRuntime and InferenceService validate against KServe's own CRD schemas (offline,
tests/deploy/data/kserve-schemas.README.md), strictly, and fit segserve's settings and protocol."""

from __future__ import annotations

import copy
import gzip
import json
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from server.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
DATA = Path(__file__).resolve().parent / "data"
RUNTIME = ROOT / "deploy/kserve/servingruntime.yaml"
SERVICE = ROOT / "deploy/kserve/inferenceservice.yaml"
SCHEMAS = {
    "ServingRuntime": "kserve-servingruntime-v1alpha1.schema.json.gz",
    "InferenceService": "kserve-inferenceservice-v1beta1.schema.json.gz",
}


def strict(schema: Any) -> Any:
    """The API server drops fields a structural schema does not name; here they fail, so a misspelled
    field is caught. Objects that keep unknown fields (x-kubernetes-preserve-unknown-fields) or are maps
    (additionalProperties) stay open."""
    if isinstance(schema, dict):
        schema = {key: strict(value) for key, value in schema.items()}
        if (
            "properties" in schema
            and "additionalProperties" not in schema
            and not schema.get("x-kubernetes-preserve-unknown-fields")
        ):
            schema["additionalProperties"] = False
        return schema
    if isinstance(schema, list):
        return [strict(item) for item in schema]
    return schema


def validator(kind: str) -> tuple[jsonschema.Draft7Validator, str]:
    bundle = json.loads(gzip.decompress((DATA / SCHEMAS[kind]).read_bytes()))
    schema = strict(bundle["openAPIV3Schema"])
    schema["properties"]["metadata"] = {"type": "object"}  # checked by the API server, not the CRD
    return jsonschema.Draft7Validator(schema), f"{bundle['group']}/{bundle['version']}"


def load(path: Path) -> dict[str, Any]:
    document: dict[str, Any] = yaml.safe_load(path.read_text())
    return document


@pytest.mark.parametrize("path", [RUNTIME, SERVICE], ids=lambda p: p.stem)
def test_manifests_validate_against_kserves_crd_schemas(path: Path) -> None:
    document = load(path)
    check, api_version = validator(document["kind"])
    assert document["apiVersion"] == api_version
    errors = [f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in check.iter_errors(document)]
    assert not errors, errors


def test_a_misspelled_field_is_rejected() -> None:
    document = load(SERVICE)
    broken = copy.deepcopy(document)
    broken["spec"]["predictor"]["model"]["protocolVersoin"] = broken["spec"]["predictor"]["model"].pop(
        "protocolVersion"
    )
    check, _ = validator("InferenceService")
    assert any("protocolVersoin" in e.message for e in check.iter_errors(broken))
    wrong_type = copy.deepcopy(document)
    wrong_type["spec"]["predictor"]["minReplicas"] = "one"
    assert not check.is_valid(wrong_type)


def test_the_runtime_and_the_service_fit_segserve() -> None:
    runtime, service = load(RUNTIME), load(SERVICE)
    model = service["spec"]["predictor"]["model"]
    assert model["runtime"] == runtime["metadata"]["name"]
    assert model["modelFormat"]["name"] in {f["name"] for f in runtime["spec"]["supportedModelFormats"]}
    assert model["protocolVersion"] == "v2" and "v2" in runtime["spec"]["protocolVersions"]
    (container,) = runtime["spec"]["containers"]
    assert container["name"] == "kserve-container"  # KServe's convention
    env = {e["name"]: e["value"] for e in container["env"]}
    assert set(env) - {"HOME"} <= {f"SEGSERVE_{name.upper()}" for name in Settings.model_fields}
    (port,) = container["ports"]
    assert port["containerPort"] == 8080 == int(env["SEGSERVE_HTTP_PORT"])  # KServe's HTTP port
    assert env["SEGSERVE_PORT"] == "8081"  # and its gRPC port
    assert container["readinessProbe"]["httpGet"] == {"path": "/v2/health/ready", "port": 8080}
