"""Model control is not anonymous (issue 40): while SEGSERVE_MODEL_CONTROL is on, load, unload and the repository
index take the control token on both doors, one is made at start when none is set (written where the log says,
mode 0600, and found there by `python -m client`), and no answer or metric label shows a server path."""

from __future__ import annotations

import logging
import os
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import grpc
import httpx
import pytest

from client import SegmentClient
from protos.inference import grpc_predict_v2_pb2 as ipb
from protos.inference import grpc_predict_v2_pb2_grpc as ipb_grpc
from tests.helpers.model_repository import build_repository
from tests.helpers.servers import ServerThread, known_settings
from tests.operations.test_metrics import scrape

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def repository(tmp_path_factory: pytest.TempPathFactory, known_weights: Path) -> Path:
    root = build_repository(tmp_path_factory.mktemp("tokened"), known_weights)
    escape = root / "escape"  # weights that lead outside the repository: refused, with a reason naming paths
    escape.mkdir()
    (escape / "weights.pt").symlink_to(known_weights)
    (escape / "config.yaml").write_text("architecture: deeplabv3_mobilenet_v3_large\nweights: weights.pt\n")
    return root


@pytest.fixture(scope="module")
def token_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("token") / "segserve" / "control-token"


@pytest.fixture(scope="module")
def controlled(repository: Path, known_weights: Path, token_file: Path) -> Iterator[ServerThread]:
    """A server with model control on and no token set: it makes one."""
    with pytest.MonkeyPatch.context() as patch:
        patch.delenv("SEGSERVE_CONTROL_TOKEN", raising=False)
        settings = known_settings(
            known_weights,
            model_repository=str(repository),
            default_model="shapes",
            model_control=True,
            control_token_file=str(token_file),
        )
    running = ServerThread(settings)
    yield running
    running.stop()


def _bearer(token: str) -> dict[str, str]:
    return {"authorization": f"Bearer {token}"}


def test_a_token_is_made_at_start_and_kept_for_the_operator_alone(controlled: ServerThread, token_file: Path) -> None:
    token = token_file.read_text().strip()
    assert len(token) >= 32
    assert stat.S_IMODE(token_file.stat().st_mode) == 0o600
    assert stat.S_IMODE(token_file.parent.stat().st_mode) == 0o700


def test_model_control_and_the_index_refuse_anonymous_callers_on_both_doors(
    controlled: ServerThread, token_file: Path, caplog: pytest.LogCaptureFixture
) -> None:
    base = f"http://127.0.0.1:{controlled.app.http_port}"
    for headers in ({}, _bearer("not-the-token"), {"authorization": "Basic eDp5"}):
        unload = httpx.post(f"{base}/v2/repository/models/shapes/unload", headers=headers, timeout=30)
        assert unload.status_code == 401, unload.text
        assert unload.headers["www-authenticate"].startswith("Bearer")
        index = httpx.post(f"{base}/v2/repository/index", headers=headers, timeout=30)
        assert index.status_code == 401, index.text
    with grpc.insecure_channel(controlled.target) as channel:
        stub = ipb_grpc.GRPCInferenceServiceStub(channel)
        for call, request in (
            (stub.RepositoryModelUnload, ipb.RepositoryModelUnloadRequest(model_name="shapes")),
            (stub.RepositoryModelLoad, ipb.RepositoryModelLoadRequest(model_name="colours")),
            (stub.RepositoryIndex, ipb.RepositoryIndexRequest()),
        ):
            with pytest.raises(grpc.RpcError) as refused:
                call(request, timeout=30, metadata=(("authorization", "Bearer wrong"),))
            assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
    # Nothing was unloaded: the model still serves.
    with SegmentClient(controlled.target, timeout=60) as client:
        assert {m.name: m.state for m in client.list_models()}["shapes"] == "READY"
    # With the token, the same calls are answered.
    token = token_file.read_text().strip()
    index = httpx.post(f"{base}/v2/repository/index", headers=_bearer(token), timeout=30)
    assert index.status_code == 200 and {m["name"] for m in index.json()} >= {"shapes", "colours", "escape"}


def test_the_client_finds_the_token_file_a_server_on_its_host_wrote(controlled: ServerThread, token_file: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "SEGSERVE_CONTROL_TOKEN"}
    cli = [sys.executable, "-m", "client", "--target", controlled.target]
    anonymous = subprocess.run(
        [*cli, "unload", "colours"], cwd=ROOT, capture_output=True, text=True, timeout=120, env=env
    )
    assert anonymous.returncode != 0 and "UNAUTHENTICATED" in anonymous.stderr + anonymous.stdout
    env["SEGSERVE_CONTROL_TOKEN_FILE"] = str(token_file)
    for command, said in (("unload", "colours: unloaded"), ("load", "colours: loaded")):
        done = subprocess.run(
            [*cli, command, "colours"], cwd=ROOT, capture_output=True, text=True, timeout=240, env=env
        )
        assert done.returncode == 0 and done.stdout.strip() == said, done.stderr


def test_no_answer_or_metric_shows_a_server_path(
    controlled: ServerThread, repository: Path, known_weights: Path, token_file: Path
) -> None:
    token = token_file.read_text().strip()
    base = f"http://127.0.0.1:{controlled.app.http_port}"
    index = httpx.post(f"{base}/v2/repository/index", headers=_bearer(token), timeout=30).json()
    escape = next(m for m in index if m["name"] == "escape")
    assert escape["state"] == "UNAVAILABLE" and "outside the model repository" in escape["reason"]
    load = httpx.post(f"{base}/v2/repository/models/escape/load", headers=_bearer(token), timeout=60)
    assert load.status_code == 400 and "outside the model repository" in load.json()["error"]
    with SegmentClient(controlled.target, timeout=60) as client:
        listed = {m.name: m.reason for m in client.list_models()}
        info = client.model_info(model="shapes")
    assert controlled.app.metrics_port
    labels = " ".join(str(k) for k in scrape(controlled.app.metrics_port))
    seen = [escape["reason"], load.json()["error"], listed["escape"], info.weights, labels]
    for server_path in {str(repository), str(repository.resolve()), str(known_weights.parent), str(known_weights)}:
        for text in seen:
            assert server_path not in text, (server_path, text)
    assert "shapes/weights.pt" in info.weights  # still says which file, without where it lives


def test_the_server_log_names_the_token_file(
    known_weights: Path, repository: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The operator finds a made token where the log says; a later start reuses it."""
    caplog.set_level(logging.INFO, logger="server.dataplane.control_token")
    token_file = tmp_path / "control-token"
    tokens = []
    for _ in range(2):
        with pytest.MonkeyPatch.context() as patch:
            patch.delenv("SEGSERVE_CONTROL_TOKEN", raising=False)
            settings = known_settings(
                known_weights, model_repository=str(repository), model_control=True, control_token_file=str(token_file)
            )
        running = ServerThread(settings)
        running.stop()
        tokens.append(token_file.read_text().strip())
    assert tokens[0] == tokens[1]
    said = [r.getMessage() for r in caplog.records if r.name == "server.dataplane.control_token"]
    assert len(said) == 2 and all(str(token_file) in line for line in said), said
