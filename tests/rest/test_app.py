"""The HTTP port: Open Inference Protocol REST with tritonclient.http (PyPI) and httpx, POST /v1/segment with curl.

Masks are judged with the known-answer model: every mask must equal Segment's label map for the same image."""

from __future__ import annotations

import base64
import io
import json
import logging
import shutil
import ssl
import subprocess
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
import httpx
import numpy as np
import pytest
import tritonclient.http as httpclient
from PIL import Image
from tritonclient.utils import InferenceServerException

from client import SegmentClient
from protos.segserve.v1 import segserve_pb2 as pb
from protos.segserve.v1 import segserve_pb2_grpc as pb_grpc
from server.inference import tensors
from tests.helpers.certs import start as start_tls
from tests.helpers.images import encode
from tests.helpers.known_model import MODEL_NAME, Shape, render_scene
from tests.helpers.servers import ServerThread, make_settings

WIDTH, HEIGHT = 200, 150
SCENES = (
    [Shape("red", "disc", cx=0.35, cy=0.45, size=0.28)],
    [Shape("green", "box", cx=0.6, cy=0.5, size=0.25)],
)


@pytest.fixture(scope="module")
def images() -> list[bytes]:
    return [encode(Image.fromarray(render_scene(WIDTH, HEIGHT, s, seed=i)[0])) for i, s in enumerate(SCENES)]


@pytest.fixture(scope="module")
def segment_masks(known_server: ServerThread, images: list[bytes]) -> list[Any]:
    with SegmentClient(known_server.target, timeout=60) as client:
        return [client.segment(image) for image in images]


@pytest.fixture(scope="module")
def base(known_server: ServerThread) -> str:
    assert known_server.app.http_port
    return f"127.0.0.1:{known_server.app.http_port}"


@pytest.fixture
def triton(base: str) -> Any:
    client = httpclient.InferenceServerClient(base, network_timeout=60)
    yield client
    client.close()


def image_input(images: list[bytes], binary: bool = True) -> httpclient.InferInput:
    tensor = httpclient.InferInput("IMAGE", [len(images)], "BYTES")
    tensor.set_data_from_numpy(np.array(images, dtype=np.object_), binary_data=binary)
    return tensor


def test_tritonclient_http_health_metadata_and_config(triton: Any, known_server: ServerThread) -> None:
    assert triton.is_server_live() and triton.is_server_ready() and triton.is_model_ready(MODEL_NAME)
    assert triton.get_server_metadata()["name"] == "segserve"
    metadata = triton.get_model_metadata(MODEL_NAME)
    assert metadata["versions"] == ["1"]
    assert [(t["name"], t["datatype"]) for t in metadata["inputs"]] == [("IMAGE", "BYTES"), ("PIXELS", "UINT8")]
    assert triton.get_model_metadata(MODEL_NAME, "1") == metadata
    config = triton.get_model_config(MODEL_NAME)
    assert config["max_batch_size"] == known_server.settings.max_queue
    assert config["dynamic_batching"]["preferred_batch_size"] == [known_server.settings.max_batch_size]
    (stats,) = triton.get_inference_statistics(MODEL_NAME)["model_stats"]
    assert stats["name"] == MODEL_NAME and stats["version"] == "1"
    assert triton.get_inference_statistics()["model_stats"] == [
        triton.get_inference_statistics(MODEL_NAME)["model_stats"][0]
    ]


def test_tritonclient_http_infer_binary_mask_equals_segment(
    triton: Any, images: list[bytes], segment_masks: list[Any]
) -> None:
    outputs = [httpclient.InferRequestedOutput(n, binary_data=True) for n in ("MASK", "MASK_PNG", "CLASSES")]
    result = triton.infer(MODEL_NAME, [image_input(images)], outputs=outputs)
    masks = result.as_numpy("MASK")
    assert masks.shape == (2, HEIGHT, WIDTH)
    for i, segment in enumerate(segment_masks):
        assert np.array_equal(masks[i], segment.mask)
        png = result.as_numpy("MASK_PNG")[i]
        assert np.array_equal(np.asarray(Image.open(io.BytesIO(png))), segment.mask)
        classes = json.loads(result.as_numpy("CLASSES")[i])
        assert [c["name"] for c in classes] == [c.name for c in segment.classes]


def test_tritonclient_http_async_infer_and_json_outputs(
    triton: Any, images: list[bytes], segment_masks: list[Any]
) -> None:
    outputs = [httpclient.InferRequestedOutput(n, binary_data=False) for n in ("MASK", "CLASSES")]
    result = triton.async_infer(MODEL_NAME, [image_input(images[:1])], outputs=outputs).get_result()
    assert np.array_equal(result.as_numpy("MASK")[0], segment_masks[0].mask)
    assert json.loads(result.as_numpy("CLASSES")[0])[0]["name"] == segment_masks[0].classes[0].name


def test_tritonclient_http_errors(triton: Any, images: list[bytes]) -> None:
    with pytest.raises(InferenceServerException) as unknown:
        triton.get_model_metadata("no-such-model")
    assert "no-such-model" in unknown.value.message() and MODEL_NAME in unknown.value.message()
    wrong = httpclient.InferInput("IMAGE", [1], "FP32")
    wrong.set_data_from_numpy(np.zeros([1], dtype=np.float32))
    with pytest.raises(InferenceServerException) as wrong_type:
        triton.infer(MODEL_NAME, [wrong])
    assert wrong_type.value.message() == "IMAGE must be BYTES, got FP32"


def test_json_tensors_with_httpx(base: str, images: list[bytes], segment_masks: list[Any]) -> None:
    """A plain JSON request: IMAGE as base64, outputs as JSON (PNGs base64, CLASSES as text)."""
    body = {
        "inputs": [
            {"name": "IMAGE", "datatype": "BYTES", "shape": [1], "data": [base64.b64encode(images[1]).decode()]}
        ],
        "outputs": [{"name": "MASK"}, {"name": "MASK_PNG"}, {"name": "CLASSES"}],
    }
    answer = httpx.post(f"http://{base}/v2/models/{MODEL_NAME}/infer", json=body, timeout=60)
    assert answer.status_code == 200, answer.text
    outputs = {o["name"]: o for o in answer.json()["outputs"]}
    mask = np.asarray(outputs["MASK"]["data"], dtype=np.uint8).reshape(HEIGHT, WIDTH)
    assert np.array_equal(mask, segment_masks[1].mask)
    assert outputs["MASK_PNG"]["parameters"] == {"content_type": "base64"}
    png = base64.b64decode(outputs["MASK_PNG"]["data"][0])
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(png))), segment_masks[1].mask)
    assert json.loads(outputs["CLASSES"]["data"][0])[0]["name"] == segment_masks[1].classes[0].name


def test_v1_segment_with_curl_raw_multipart_and_json(
    base: str, images: list[bytes], segment_masks: list[Any], tmp_path: Path
) -> None:
    curl = shutil.which("curl")
    assert curl, "curl is part of the development image"
    photo = tmp_path / "photo.png"
    photo.write_bytes(images[0])
    mask = tmp_path / "mask.png"
    subprocess.run(
        [
            curl,
            "-sf",
            "--data-binary",
            f"@{photo}",
            "-H",
            "Content-Type: image/png",
            f"http://{base}/v1/segment",
            "-o",
            str(mask),
        ],
        check=True,
        timeout=60,
    )
    assert np.array_equal(np.asarray(Image.open(mask)), segment_masks[0].mask)
    multipart = subprocess.run(
        [curl, "-sf", "-F", f"file=@{photo}", "-H", "Accept: application/json", f"http://{base}/v1/segment"],
        check=True,
        timeout=60,
        capture_output=True,
    )
    answer = json.loads(multipart.stdout)
    assert (answer["width"], answer["height"]) == (WIDTH, HEIGHT)
    assert [c["name"] for c in answer["classes"]] == [c.name for c in segment_masks[0].classes]
    png = base64.b64decode(answer["mask_png"])
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(png))), segment_masks[0].mask)
    # the command as written: curl's default Content-Type for --data-binary (a form encoding) is taken
    plain = tmp_path / "plain.png"
    subprocess.run(
        [curl, "-sf", "--data-binary", f"@{photo}", f"http://{base}/v1/segment", "-o", str(plain)],
        check=True,
        timeout=60,
    )
    assert np.array_equal(np.asarray(Image.open(plain)), segment_masks[0].mask)
    # a Content-Type that is not an image is refused, with a sentence
    refused = subprocess.run(
        [
            curl,
            "-s",
            "-w",
            "\n%{http_code}",
            "--data-binary",
            f"@{photo}",
            "-H",
            "Content-Type: application/json",
            f"http://{base}/v1/segment",
        ],
        check=True,
        timeout=60,
        capture_output=True,
        text=True,
    )
    text, status = refused.stdout.rsplit("\n", 1)
    assert status == "415" and "is not an image" in json.loads(text)["error"]


def test_hostile_http_requests_get_clear_statuses(base: str, images: list[bytes], known_server: ServerThread) -> None:
    url = f"http://{base}/v2/models/{MODEL_NAME}/infer"
    settings = known_server.settings
    one = base64.b64encode(images[0]).decode()

    def infer(body: object, **kwargs: Any) -> httpx.Response:
        return httpx.post(url, json=body, timeout=60, **kwargs)

    def image(data: list[object], shape: list[int]) -> dict[str, Any]:
        return {"inputs": [{"name": "IMAGE", "datatype": "BYTES", "shape": shape, "data": data}]}

    cases: list[tuple[httpx.Response, int, str]] = [
        (infer(image([one], [2])), 400, "1 values do not match shape [2]"),
        (infer(image(["***"], [1])), 400, "not valid base64"),
        (infer(image([[[[one]]]], [1])), 400, "nested deeper than its shape"),
        (infer({"inputs": "x"}), 400, "needs an inputs list"),
        (infer({**image([one], [1]), "parameters": {"overlay": "yes"}}), 400, "parameter overlay must be bool"),
        (infer(image([one], [1]), headers={"content-encoding": "gzip"}), 415, "Content-Encoding gzip is not taken"),
        (infer(image([one], [1] * 9)), 400, "shape has 9 dimensions; at most 8"),
        (httpx.get(f"http://{base}/v2/models/{MODEL_NAME}/versions/2", timeout=60), 404, "its one version is '1'"),
        (infer(image([one] * (settings.max_queue + 1), [settings.max_queue + 1])), 413, "can never fit the queue"),
        (httpx.post(url, content=b"[" * 100_000 + b"]" * 100_000, timeout=60), 400, "nested too deeply"),
        (httpx.post(url, content=b"{not json", timeout=60), 400, "not valid JSON"),
        (httpx.post(url, content=b"x", headers={"content-type": "text/plain"}, timeout=60), 415, "text/plain"),
        (httpx.post(url, content=b"x" * (settings.max_message_bytes + 1), timeout=60), 413, "at most"),
        (httpx.post(f"http://{base}/v2/models/other/infer", content=b"{}", timeout=60), 404, MODEL_NAME),
        (httpx.get(f"http://{base}/v2/nothing", timeout=60), 404, "no such endpoint"),
        (
            httpx.post(url, content=b'{"inputs":[]}', headers={"Inference-Header-Content-Length": "999"}, timeout=60),
            400,
            "outside the body",
        ),
        (
            httpx.post(
                f"http://{base}/v1/segment",
                content=b"x" * (settings.max_image_bytes + 1),
                headers={"content-type": "image/jpeg"},
                timeout=60,
            ),
            413,
            "at most",
        ),
        (
            httpx.post(
                f"http://{base}/v1/segment?max_size=3", content=images[0], headers={"content-type": "image/png"}
            ),
            400,
            "max_size",
        ),
    ]

    def chunked(total: int) -> Iterator[bytes]:  # no Content-Length: the limit is found while reading
        piece = 64 * 1024
        for start in range(0, total, piece):
            yield b"x" * min(piece, total - start)

    response = httpx.post(url, content=chunked(settings.max_message_bytes + 1024), timeout=60)
    assert "content-length" not in response.request.headers
    cases.append((response, 413, "the body passed"))
    raw = tensors.to_raw([images[0]])
    header = json.dumps(
        {
            "inputs": [
                {"name": "IMAGE", "datatype": "BYTES", "shape": [1], "parameters": {"binary_data_size": len(raw) + 5}}
            ]
        }
    ).encode()
    cases.append(
        (
            httpx.post(
                url, content=header + raw, headers={"Inference-Header-Content-Length": str(len(header))}, timeout=60
            ),
            400,
            "runs past the body",
        )
    )
    for response, status, words in cases:
        assert response.status_code == status, (words, response.status_code, response.text)
        error = response.json()["error"]
        assert words in error and "Traceback" not in error, (words, error)
    assert httpx.get(f"http://{base}/v2/health/ready", timeout=10).json() == {"ready": True}


def test_a_method_the_route_does_not_take_is_405_with_allow(server: ServerThread) -> None:
    """RFC 9110 15.5.6: a 405 carries Allow, the methods the resource takes."""
    base = f"127.0.0.1:{server.app.http_port}"
    trace = httpx.request("TRACE", f"http://{base}/v2/health/live", timeout=10)
    assert trace.status_code == 405 and trace.headers["allow"] == "GET, HEAD", trace.headers
    delete = httpx.delete(f"http://{base}/v2/models/{server.app.pipeline.models.default_name}/infer", timeout=10)
    assert delete.status_code == 405 and delete.headers["allow"] == "POST", delete.headers
    assert "DELETE is not allowed" in delete.json()["error"] and "it takes POST" in delete.json()["error"]


def test_get_v2_with_a_trailing_slash_is_server_metadata_with_no_redirect(server: ServerThread) -> None:
    """The published specification names GET /v2/, Triton's GET v2: both answer 200 at once."""
    base = f"127.0.0.1:{server.app.http_port}"
    model = server.app.pipeline.models.default_name
    for path in ("/v2/", "/v2", "/v2/health/ready/", f"/v2/models/{model}/"):
        response = httpx.get(f"http://{base}{path}", timeout=10, follow_redirects=False)
        assert response.status_code == 200, (path, response.status_code, response.headers)
    assert httpx.get(f"http://{base}/v2/", timeout=10).json()["name"] == "segserve"


def test_http_calls_are_counted_by_protocol(base: str, images: list[bytes], known_server: ServerThread) -> None:
    metrics = known_server.app.metrics
    assert metrics is not None

    def count(protocol: str, code: str) -> float:
        return (
            metrics.registry.get_sample_value("segserve_protocol_requests_total", {"protocol": protocol, "code": code})
            or 0.0
        )

    before = count("segment-http", "OK"), count("inference-http", "INVALID_ARGUMENT")
    httpx.post(f"http://{base}/v1/segment", content=images[0], headers={"content-type": "image/png"}, timeout=60)
    httpx.post(f"http://{base}/v2/models/{MODEL_NAME}/infer", json={"inputs": []}, timeout=60)
    assert (count("segment-http", "OK"), count("inference-http", "INVALID_ARGUMENT")) == (before[0] + 1, before[1] + 1)


def test_the_http_port_takes_the_grpc_tls_settings(certs: Path) -> None:
    """TLS with a client CA on gRPC means HTTPS with client certificates on the HTTP port too."""
    server = start_tls(certs, client_ca=True)
    try:
        url = f"https://localhost:{server.app.http_port}/v2/health/live"
        context = ssl.create_default_context(cafile=str(certs / "ca.pem"))
        context.load_cert_chain(str(certs / "client.pem"), str(certs / "client.key"))
        assert httpx.get(url, verify=context, timeout=30).json() == {"live": True}
        anonymous = ssl.create_default_context(cafile=str(certs / "ca.pem"))
        with pytest.raises(httpx.HTTPError):  # no client certificate: the handshake fails
            httpx.get(url, verify=anonymous, timeout=30)
        with pytest.raises(httpx.HTTPError):  # plaintext to a TLS port
            httpx.get(url.replace("https", "http"), timeout=30)
    finally:
        server.stop()


async def _hold_places(server: ServerThread) -> list[Any]:
    return [server.app.pipeline.admit() for _ in range(server.settings.max_queue)]


async def _give_back(slots: list[Any]) -> None:
    for slot in slots:
        slot.release()


def test_a_full_queue_is_429_and_a_draining_server_503(
    base: str, images: list[bytes], known_server: ServerThread
) -> None:
    held = known_server.call(_hold_places(known_server))
    try:
        full = httpx.post(
            f"http://{base}/v1/segment", content=images[0], headers={"content-type": "image/png"}, timeout=60
        )
        body = {
            "inputs": [
                {"name": "IMAGE", "datatype": "BYTES", "shape": [1], "data": [base64.b64encode(images[0]).decode()]}
            ]
        }
        full_infer = httpx.post(f"http://{base}/v2/models/{MODEL_NAME}/infer", json=body, timeout=60)
    finally:
        known_server.call(_give_back(held))
    for response in (full, full_infer):
        assert response.status_code == 429 and "server busy" in response.json()["error"]
    pipeline = known_server.app.pipeline
    pipeline.draining = True
    try:
        draining = httpx.post(
            f"http://{base}/v1/segment", content=images[0], headers={"content-type": "image/png"}, timeout=60
        )
        ready = httpx.get(f"http://{base}/v2/health/ready", timeout=60)
    finally:
        pipeline.draining = False
    assert draining.status_code == 503 and "shutting down" in draining.json()["error"]
    assert ready.status_code == 503 and ready.json() == {"ready": False}


def test_calls_on_both_new_doors_write_one_log_line_with_their_protocol(
    base: str, images: list[bytes], known_server: ServerThread, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="segserve.access")
    headers = {"content-type": "image/png", "x-request-id": "rest-1"}
    segmented = httpx.post(f"http://{base}/v1/segment", content=images[0], headers=headers, timeout=60)
    assert segmented.headers["x-request-id"] == "rest-1"
    body = {
        "inputs": [
            {"name": "IMAGE", "datatype": "BYTES", "shape": [2], "data": [base64.b64encode(i).decode() for i in images]}
        ]
    }
    httpx.post(f"http://{base}/v2/models/{MODEL_NAME}/infer", json=body, headers={"x-request-id": "rest-2"}, timeout=60)
    httpx.get(f"http://{base}/v2/health/ready", headers={"x-request-id": "rest-3"}, timeout=60)
    lines = {
        json.loads(r.getMessage())["request_id"]: json.loads(r.getMessage())
        for r in caplog.records
        if r.name == "segserve.access"
    }
    assert lines["rest-1"]["protocol"] == "segment-http" and lines["rest-1"]["width"] == WIDTH
    assert lines["rest-2"]["protocol"] == "inference-http" and lines["rest-2"]["images"] == 2
    assert lines["rest-2"]["status"] == "OK"
    assert "rest-3" not in lines  # probes are counted, not logged


def test_bodies_in_progress_share_the_upload_budget(images: list[bytes]) -> None:
    """A slow sender holds what it sent against SEGSERVE_UPLOAD_BUDGET_BYTES, as a SegmentUpload would;
    a body that would pass the budget meanwhile is refused with 429, and the bytes go back when done."""
    budget = 1024 * 1024
    server = ServerThread(make_settings(upload_budget_bytes=budget, warmup=False))
    url = f"http://127.0.0.1:{server.app.http_port}/v1/segment"
    pipeline = server.app.pipeline
    go_on = threading.Event()

    def slow_body() -> Iterator[bytes]:
        yield images[0][:1000]
        go_on.wait(30)
        yield images[0][1000:]

    try:
        with ThreadPoolExecutor(1) as pool:
            slow = pool.submit(httpx.post, url, content=slow_body(), headers={"content-type": "image/png"}, timeout=60)
            deadline = time.monotonic() + 30
            while pipeline.uploads.in_flight == 0 and time.monotonic() < deadline:
                time.sleep(0.05)
            assert pipeline.uploads.in_flight == 1000
            big = b"x" * (budget - 500)
            refused = httpx.post(url, content=big, headers={"content-type": "image/png"}, timeout=60)
            go_on.set()
            assert slow.result().status_code == 200
        assert refused.status_code == 429 and "SEGSERVE_UPLOAD_BUDGET_BYTES" in refused.json()["error"]
        assert pipeline.uploads.in_flight == 0
    finally:
        go_on.set()
        server.stop()


async def test_a_taken_http_port_is_logged_and_both_servers_serve_grpc(caplog: pytest.LogCaptureFixture) -> None:
    """Two servers built before either starts, as replicas on one host network are: the second finds the
    HTTP port taken when it is built, says so, and serves gRPC without it; neither stops."""
    from server.app import create_app

    first = await create_app(make_settings(http_port=0))
    assert first.http_port is not None
    second = await create_app(make_settings(http_port=first.http_port))
    try:
        assert second.http is None
        for app in (first, second):
            await app.start()
            assert app.pipeline.ready
        for app in (first, second):  # each answers a real Segment call over gRPC
            async with grpc.aio.insecure_channel(f"127.0.0.1:{app.port}") as channel:
                answer = await pb_grpc.SegmenterStub(channel).Segment(
                    pb.SegmentRequest(image=encode(Image.new("RGB", (40, 30), "red"))), timeout=60
                )
            assert (answer.width, answer.height) == (40, 30) and answer.mask_png.startswith(b"\x89PNG")
    finally:
        for app in (first, second):
            await app.stop(0)
    assert any("HTTP port not started" in r.getMessage() and r.levelname == "ERROR" for r in caplog.records)
