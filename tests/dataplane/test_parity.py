"""The same request through every door gives the same metrics, statistics and access-record fields: Segment over
gRPC, POST /v1/segment, and ModelInfer over gRPC and REST. The doors only parse and serialise; what is counted
is counted once, by the data plane (server/dataplane/plane.py). And while draining, the repository index says
the same over both doors."""

from __future__ import annotations

import base64
import json
import logging
from collections.abc import Callable
from typing import Any

import grpc
import httpx
import pytest

from protos.inference import grpc_predict_v2_pb2 as ipb
from protos.inference import grpc_predict_v2_pb2_grpc as ipb_grpc
from protos.segserve.v1 import segserve_pb2 as pb
from protos.segserve.v1 import segserve_pb2_grpc as pb_grpc
from tests.helpers.images import encode, photo_like
from tests.helpers.servers import ServerThread
from tests.operations.test_metrics import scrape, value

PHOTO = encode(photo_like(96, 72), "JPEG")
STAGES = ("preprocess", "queue", "inference", "postprocess")
ACCESS_FIELDS = ("image_id", "width", "height", "batch_size", "model", "status")


def _segment_grpc(server: ServerThread) -> None:
    with grpc.insecure_channel(server.target) as channel:
        pb_grpc.SegmenterStub(channel).Segment(pb.SegmentRequest(id="p", image=PHOTO), timeout=60)


def _segment_http(server: ServerThread) -> None:
    response = httpx.post(
        f"http://127.0.0.1:{server.app.http_port}/v1/segment",
        content=PHOTO,
        headers={"content-type": "image/jpeg"},
        timeout=60,
    )
    assert response.status_code == 200, response.text


def _infer_grpc(server: ServerThread) -> None:
    request = ipb.ModelInferRequest(
        model_name=_model_name(server),
        id="p",
        inputs=[ipb.ModelInferRequest.InferInputTensor(name="IMAGE", datatype="BYTES", shape=[1])],
        raw_input_contents=[len(PHOTO).to_bytes(4, "little") + PHOTO],
    )
    with grpc.insecure_channel(server.target) as channel:
        ipb_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request, timeout=60)


def _infer_http(server: ServerThread) -> None:
    body = {
        "id": "p",
        "inputs": [{"name": "IMAGE", "datatype": "BYTES", "shape": [1], "data": [base64.b64encode(PHOTO).decode()]}],
    }
    url = f"http://127.0.0.1:{server.app.http_port}/v2/models/{_model_name(server)}/infer"
    response = httpx.post(url, json=body, timeout=60)
    assert response.status_code == 200, response.text


def _model_name(server: ServerThread) -> str:
    return server.app.pipeline.models.default_name


def _inference_count(server: ServerThread) -> tuple[int, int]:
    statistics = server.app.pipeline.models.get("").statistics
    return statistics.inference_count, statistics.success.count


DOORS: dict[str, Callable[[ServerThread], None]] = {
    "Segment": _segment_grpc,
    "http Segment": _segment_http,
    "ModelInfer": _infer_grpc,
    "http ModelInfer": _infer_http,
}


def _one_call(server: ServerThread, door: str, caplog: pytest.LogCaptureFixture) -> dict[str, Any]:
    """What one call of the photo through `door` moved: metrics, statistics, and its access line's fields."""
    port = server.app.metrics_port
    assert port
    model = _model_name(server)
    before, counted_before = scrape(port), _inference_count(server)
    caplog.clear()
    DOORS[door](server)
    after, counted_after = scrape(port), _inference_count(server)

    def moved(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    lines = [json.loads(r.getMessage()) for r in caplog.records if r.name == "segserve.access"]
    assert len(lines) == 1, lines
    return {
        "images OK": moved("segserve_images_total", code="OK"),
        "model images OK": moved("segserve_model_images_total", model=model, code="OK"),
        **{f"stage {s}": moved("segserve_stage_seconds_count", stage=s) for s in STAGES},
        "inference_count, success": tuple(a - b for a, b in zip(counted_after, counted_before, strict=True)),
        "access fields": sorted(k for k in lines[0] if k in ACCESS_FIELDS),
        "access model": lines[0].get("model"),
        "access size": (lines[0].get("width"), lines[0].get("height")),
    }


def test_one_photo_counts_alike_through_every_door(server: ServerThread, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="segserve.access")
    seen = {door: _one_call(server, door, caplog) for door in DOORS}
    expected = {
        "images OK": 1,
        "model images OK": 1,
        **{f"stage {s}": 1 for s in STAGES},
        "inference_count, success": (1, 1),
        "access fields": sorted(ACCESS_FIELDS),
        "access model": _model_name(server),
        "access size": (96, 72),
    }
    for door, figures in seen.items():
        assert figures == expected, f"{door}: {figures}"


def test_the_index_says_the_same_over_both_doors_while_draining(server: ServerThread) -> None:
    pipeline = server.app.pipeline
    pipeline.draining = True
    try:
        with grpc.insecure_channel(server.target) as channel:
            over_grpc = ipb_grpc.GRPCInferenceServiceStub(channel).RepositoryIndex(
                ipb.RepositoryIndexRequest(), timeout=30
            )
        over_http = httpx.post(f"http://127.0.0.1:{server.app.http_port}/v2/repository/index", timeout=30).json()
    finally:
        pipeline.draining = False
    grpc_index = [{"name": m.name, "state": m.state, "reason": m.reason} for m in over_grpc.models]
    http_index = [{"name": m["name"], "state": m["state"], "reason": m.get("reason", "")} for m in over_http]
    assert grpc_index == http_index
    assert grpc_index and all(m["state"] == "UNAVAILABLE" and m["reason"] == "shutting down" for m in grpc_index)
