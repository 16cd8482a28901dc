"""The HTTP door through a real drain (docs/operations.md, 'Draining on SIGTERM', step 2): App.stop with HTTP
calls held in the model. What an HTTP caller must see: the calls under way finish with 200 and their answers,
and the drain waits for them; a new call is refused 503 ("shutting down") and readiness says 503 while the
drain lasts; once stopped, the port takes no connection. The model is held by a gate, so nothing depends on
timing."""

from __future__ import annotations

import asyncio
import base64
import io
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import grpc
import httpx
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from PIL import Image

from server.operations import drain
from tests.helpers.gate import Gate, wait_until
from tests.helpers.images import encode, photo_like
from tests.helpers.servers import ServerThread, make_settings

GRACE_S = 30.0
WIDTH, HEIGHT = 80, 60
IMAGE = encode(photo_like(WIDTH, HEIGHT), "PNG")


@pytest.fixture
def gated() -> Iterator[tuple[ServerThread, Gate]]:
    gate = Gate()
    server = ServerThread(make_settings(warmup=False, grace_period_s=GRACE_S), runtime_factory=gate.gated_runtime)
    yield server, gate
    gate.open.set()
    if server.thread.is_alive():
        if not server.app.pipeline.draining:
            server.call(server.app.stop(1.0))
        server.loop.call_soon_threadsafe(server.loop.stop)
        server.thread.join(10)


def infer_body() -> dict[str, object]:
    image = base64.b64encode(IMAGE).decode()
    return {
        "inputs": [{"name": "IMAGE", "datatype": "BYTES", "shape": [1], "data": [image]}],
        "outputs": [{"name": "MASK_PNG"}],
    }


def test_a_drain_finishes_http_calls_under_way_and_refuses_new_ones(gated: tuple[ServerThread, Gate]) -> None:
    server, gate = gated
    base = f"http://127.0.0.1:{server.app.http_port}"
    model = server.settings.model
    gate.open.clear()
    with ThreadPoolExecutor(2) as callers, httpx.Client(base_url=base, timeout=60) as http:
        segmenting = callers.submit(
            http.post, "/v1/segment", content=IMAGE, headers={"content-type": "image/png", "accept": "application/json"}
        )
        inferring = callers.submit(http.post, f"/v2/models/{model}/infer", json=infer_body())
        wait_until(lambda: server.app.pipeline.in_flight == 2, "both HTTP calls are admitted, held behind the gate")

        stopping = asyncio.run_coroutine_threadsafe(server.app.stop(GRACE_S), server.loop)
        wait_until(lambda: server.app.pipeline.draining, "the drain has begun")
        try:
            # Long past the quiet time after which a drain that counted nothing would end and close the port:
            # the held HTTP calls must keep it open. Meanwhile a new call on a new connection is refused 503,
            # readiness says no, and the drain has not ended.
            time.sleep(drain.QUIET_S * 4)
            with httpx.Client(base_url=base, timeout=30) as newcomer:
                refused = newcomer.post("/v1/segment", content=IMAGE, headers={"content-type": "image/png"})
                refused_infer = newcomer.post(f"/v2/models/{model}/infer", json=infer_body())
                ready = newcomer.get("/v2/health/ready")
                live = newcomer.get("/v2/health/live")
            with grpc.insecure_channel(server.target) as channel:
                health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=30)
            assert not stopping.done(), "the drain ended with HTTP calls still held in the model"
            assert not segmenting.done() and not inferring.done()
        finally:
            gate.open.set()
        segmented, inferred = segmenting.result(60), inferring.result(60)
        stopping.result(GRACE_S)

    for response in (refused, refused_infer):
        assert response.status_code == 503, response.text
        assert response.json()["error"] == "server is shutting down; retry on another replica"
    assert ready.status_code == 503 and ready.json() == {"ready": False}
    assert live.status_code == 200  # alive while draining: a liveness probe must not restart it mid-drain
    assert health.status == health_pb2.HealthCheckResponse.NOT_SERVING

    assert segmented.status_code == 200, segmented.text
    answer = segmented.json()
    assert (answer["width"], answer["height"], answer["model"]) == (WIDTH, HEIGHT, model)
    assert Image.open(io.BytesIO(base64.b64decode(answer["mask_png"]))).size == (WIDTH, HEIGHT)
    assert inferred.status_code == 200, inferred.text
    (mask_png,) = inferred.json()["outputs"]
    assert mask_png["name"] == "MASK_PNG"
    assert Image.open(io.BytesIO(base64.b64decode(mask_png["data"][0]))).size == (WIDTH, HEIGHT)
    assert sorted(gate.batches) == [1, 1] or gate.batches == [2]  # the held calls reached the model, once each

    server.loop.call_soon_threadsafe(server.loop.stop)
    server.thread.join(10)
    with pytest.raises(httpx.ConnectError):  # stopped: the port is closed
        httpx.get(f"{base}/v2/health/live", timeout=10)
