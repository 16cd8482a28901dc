"""Runtimes: one-line start-up errors, and agreement with torch on a model whose
masks depend on the image (the known-answer model; random weights paint one class everywhere)."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch

from server.errors import ModelLoadError
from server.runtimes import cpu_features, factory
from server.runtimes.base import Runtime
from server.runtimes.factory import create_runtime
from server.runtimes.int8 import read_packed
from server.runtimes.openvino_runtime import OpenVinoRuntime, compiled_precision, ov
from tests.helpers.known_model import CLASS_OF, SHAPE_FLOOR, Shape, iou, random_shapes, render_scene
from tests.helpers.servers import known_settings, make_settings

ROOT = Path(__file__).resolve().parents[2]
CPU = torch.device("cpu")
GRAPH_RUNTIMES = ["onnxruntime", "openvino"]
# (height, width): the trained scale, portrait, landscape, odd sizes the graph never saw at export.
SHAPES = [(128, 128), (128, 96), (96, 128), (77, 101)]
BATCH_SIZES = [1, 3]


def test_a_runtime_asked_for_but_not_installed_is_a_one_line_error(monkeypatch: pytest.MonkeyPatch) -> None:
    real = factory.importable
    monkeypatch.setattr(factory, "importable", lambda name: name != "openvino" and real(name))
    with pytest.raises(ModelLoadError, match=r"runtime openvino asked for .* not installed") as info:
        factory.plan(make_settings(runtime="openvino").model_settings(), CPU)
    assert "\n" not in str(info.value)


def test_the_server_refuses_to_start_with_an_uninstalled_runtime(tmp_path: Path) -> None:
    """A real `python -m server`, with openvino made unimportable by a shadowing package."""
    fake = tmp_path / "openvino"
    fake.mkdir()
    (fake / "__init__.py").write_text("raise ImportError('openvino hidden by the test')\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), str(ROOT)])}
    done = subprocess.run(
        [
            *(sys.executable, "-m", "server", "--runtime", "openvino", "--weights", "random", "--device", "cpu"),
            *(
                "--host",
                "127.0.0.1",
                "--port",
                "0",
                "--metrics-port",
                "-1",
                "--max-size",
                "64",
                "--grace-period-s",
                "0",
            ),
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 1, done.stderr[-2000:]
    errors = [line for line in done.stderr.splitlines() if " ERROR " in line]
    assert len(errors) == 1 and "cannot start: runtime openvino asked for" in errors[0], done.stderr[-2000:]
    assert "Traceback" not in done.stderr


@pytest.mark.parametrize(
    ("overrides", "words"),
    [
        ({"runtime": "torch", "precision": "fp16"}, "needs a CUDA device"),
        ({"runtime": "torch", "capture": True}, "SEGSERVE_CAPTURE needs a CUDA device"),
        ({"runtime": "torch", "precision": "int8"}, "int8 is offered by the onnxruntime and openvino runtimes"),
        ({"runtime": "onnxruntime", "precision": "bf16"}, "bf16 by openvino on the CPU"),
        ({"precision": "fp16"}, "precision fp16 is not offered by any runtime on cpu"),
        ({"runtime": "torch", "model_instances": 2}, "INSTANCES above 1 is offered by the onnxruntime and openvino"),
        (
            {"runtime": "openvino", "inference_threads": 2, "model_instances": 3},
            "MODEL_INSTANCES=3 is more than the 2 inference threads",
        ),
    ],
    ids=[
        "fp16-on-cpu",
        "capture-on-cpu",
        "int8-torch",
        "bf16-onnxruntime",
        "fp16-auto-on-cpu",
        "instances-torch",
        "instances-over-threads",
    ],
)
def test_options_a_runtime_does_not_offer_here_are_one_line_errors(
    overrides: dict[str, object], words: str, tmp_path: Path
) -> None:
    with pytest.raises(ModelLoadError, match=words) as info:
        create_runtime(make_settings(cache_dir=str(tmp_path), **overrides).model_settings())
    assert "\n" not in str(info.value)


# ---- agreement, on the known-answer model -----------------------------------------------------------


def scenes(height: int, width: int, count: int, seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [render_scene(width, height, random_shapes(rng, 2), seed=seed * 100 + k) for k in range(count)]


@pytest.fixture(scope="module")
def graph_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("graphs")


@pytest.fixture(scope="module")
def known_runtimes(known_weights: Path, graph_cache: Path) -> dict[str, Runtime]:
    cache = graph_cache
    return {
        # fp32 named: the 99.9% bound below is for fp32 runtimes; auto may pick bf16 on CPUs that have it.
        name: create_runtime(
            known_settings(known_weights, runtime=name, precision="fp32", cache_dir=str(cache)).model_settings()
        )
        for name in ["torch", *GRAPH_RUNTIMES]
    }


def test_the_known_model_segments_under_torch(known_runtimes: dict[str, Runtime]) -> None:
    """Agreement below means something only if torch's masks follow the image."""
    image, truth = render_scene(128, 96, [Shape("red", "disc", 0.3, 0.5, 0.25), Shape("blue", "box", 0.72, 0.5, 0.2)])
    (labels,) = known_runtimes["torch"].predict([image])
    scores = [iou(labels, truth, CLASS_OF[colour]) for colour in ("red", "blue")]
    assert min(scores) >= SHAPE_FLOOR, scores


@pytest.mark.parametrize("name", GRAPH_RUNTIMES)
@pytest.mark.parametrize("shape", SHAPES, ids=[f"{h}x{w}" for h, w in SHAPES])
@pytest.mark.parametrize("batch_size", BATCH_SIZES)
def test_label_maps_equal_torchs_on_at_least_999_per_mille_of_pixels(
    known_runtimes: dict[str, Runtime], name: str, shape: tuple[int, int], batch_size: int
) -> None:
    images = [image for image, _ in scenes(*shape, batch_size, seed=shape[0] + shape[1] + batch_size)]
    expected = known_runtimes["torch"].predict(images)
    got = known_runtimes[name].predict(images)
    assert len(got) == batch_size
    for reference, labels in zip(expected, got, strict=True):
        assert labels.shape == shape and labels.dtype == np.uint8
        assert len(np.unique(reference)) > 1, "the reference mask is one class: the comparison would prove nothing"
        agreement = float((labels == reference).mean())
        assert agreement >= 0.999, f"{name} agrees with torch on {agreement:.4%} of pixels"


@pytest.mark.parametrize("name", ["torch", *GRAPH_RUNTIMES])
def test_a_batch_gives_each_image_what_it_gets_alone(known_runtimes: dict[str, Runtime], name: str) -> None:
    images = [image for image, _ in scenes(96, 128, 4, seed=7)]
    runtime = known_runtimes[name]
    together = runtime.predict(images)
    assert len({m.tobytes() for m in together}) == len(images), "masks should differ between these scenes"
    for image, batched in zip(images, together, strict=True):
        assert np.array_equal(runtime.predict([image])[0], batched)


@pytest.mark.parametrize("name", GRAPH_RUNTIMES)
def test_two_instances_serve_two_calls_at_once_and_segment_as_one_does(
    known_runtimes: dict[str, Runtime], known_weights: Path, graph_cache: Path, name: str
) -> None:
    """Each instance an engine of its own (an OpenVINO infer request or an onnxruntime session): two calls at
    once must neither wait for one engine nor share it (OpenVINO refuses a busy request)."""
    settings = known_settings(
        known_weights, runtime=name, precision="fp32", cache_dir=str(graph_cache), inference_threads=2
    )
    runtime = create_runtime(settings.model_settings(model_instances=2))
    assert "2 threads, 2 instances" in runtime.description
    assert runtime.engines.size == 2  # type: ignore[attr-defined]
    if name == "openvino":
        assert int(runtime.compiled.get_property("NUM_STREAMS")) == 2  # type: ignore[attr-defined]
    images = [image for image, _ in scenes(96, 128, 4, seed=11)]
    expected = known_runtimes["torch"].predict(images)
    started = threading.Barrier(2)

    def segment(k: int) -> list[np.ndarray]:
        started.wait(10)  # both threads call at the same moment, every time
        return [runtime.predict([images[j % 4]])[0] for j in range(k, k + 8)]

    with ThreadPoolExecutor(2) as pool:
        results = list(pool.map(segment, [0, 1]))
    for k, got in enumerate(results):
        for j, labels in enumerate(got, start=k):
            agreement = float((labels == expected[j % 4]).mean())
            assert agreement >= 0.999, f"{name}, 2 instances, agrees with torch on {agreement:.4%} of pixels"


def test_descriptions_name_the_engine(known_runtimes: dict[str, Runtime]) -> None:
    assert known_runtimes["onnxruntime"].description.startswith("onnxruntime 1.")
    assert "CPUExecutionProvider" in known_runtimes["onnxruntime"].description
    assert known_runtimes["openvino"].description.startswith("openvino 20")
    assert known_runtimes["torch"].description.startswith(f"torch {torch.__version__} eager (cpu, fp32")


def test_openvino_bf16_says_what_the_cpu_computes(known_weights: Path, graph_cache: Path) -> None:
    """bf16 where the CPU has bf16 units (OpenVINO then computes bf16: its masks differ slightly from fp32's),
    fp32 where it lacks them (OpenVINO ignores the hint); the description says the same."""
    runtime = create_runtime(
        known_settings(known_weights, runtime="openvino", precision="bf16", cache_dir=str(graph_cache)).model_settings()
    )
    assert isinstance(runtime, OpenVinoRuntime)
    native = cpu_features.native_bf16()
    assert compiled_precision(runtime.compiled) == ("bf16" if native else "f32")
    assert runtime.precision == ("bf16" if native else "fp32"), runtime.description
    assert ("CPU, bf16, " in runtime.description) == native, runtime.description


def test_openvino_compiled_precision_reads_the_type_not_its_repr() -> None:
    class Compiled:
        def __init__(self, hint: ov.Type) -> None:
            self.hint = hint

        def get_property(self, name: str) -> ov.Type:
            assert name == "INFERENCE_PRECISION_HINT"
            return self.hint

    assert compiled_precision(Compiled(ov.Type.bf16)) == "bf16"  # type: ignore[arg-type]
    assert compiled_precision(Compiled(ov.Type.f32)) == "f32"  # type: ignore[arg-type]


@pytest.mark.parametrize("name", GRAPH_RUNTIMES)
def test_int8_asked_for_is_a_quantized_model_that_still_segments(
    known_weights: Path, tmp_path: Path, name: str
) -> None:
    """Each runtime's own int8: ONNX Runtime's QDQ graph; OpenVINO's NNCF model, its convolutions fed by
    FakeQuantize operations, cached as one packed file and loaded back from it."""
    runtime = create_runtime(
        known_settings(known_weights, runtime=name, precision="int8", cache_dir=str(tmp_path)).model_settings()
    )
    assert runtime.precision == "int8" and runtime.description.startswith(name) and "int8" in runtime.description
    if isinstance(runtime, OpenVinoRuntime):
        packed = list(tmp_path.glob("*-int8-*.ovpack"))
        assert len(packed) == 1, "the quantized model is cached"
        assert "FakeQuantize" in {op.get_type_name() for op in read_packed(ov.Core(), packed[0]).get_ordered_ops()}
        assert "the rest in" in runtime.description
        if cpu_features.native_int8():  # where the CPU has int8 units, every convolution runs in int8 (depthwise too)
            kernels = [op.get_rt_info() for op in runtime.compiled.get_runtime_model().get_ordered_ops()]
            convolutions = [
                k["runtimePrecision"].astype(str) for k in kernels if k["layerType"].astype(str) == "Convolution"
            ]
            assert convolutions and set(convolutions) <= {"i8", "u8"}, sorted(set(convolutions))
    else:
        import onnx

        from server.runtimes.onnxruntime_runtime import OnnxRuntimeRuntime

        assert isinstance(runtime, OnnxRuntimeRuntime)
        ops = {node.op_type for node in onnx.load(str(runtime.graph)).graph.node}
        assert {"QuantizeLinear", "DequantizeLinear"} <= ops, "the graph served is not quantized"
    image, truth = render_scene(128, 96, [Shape("green", "disc", 0.35, 0.5, 0.25), Shape("red", "box", 0.7, 0.5, 0.2)])
    (labels,) = runtime.predict([image])
    scores = [iou(labels, truth, CLASS_OF[colour]) for colour in ("green", "red")]
    assert min(scores) >= SHAPE_FLOOR, scores


def test_onnxruntime_on_cuda_takes_tensorrt_then_cuda_and_says_so_when_neither_is_there(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """The provider choice, checked on any machine: which providers exist is what onnxruntime reports."""
    import onnxruntime as ort

    from server.runtimes.onnxruntime_runtime import providers_for

    assert providers_for(CPU, tmp_path) == ["CPUExecutionProvider"]
    everything = ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]
    monkeypatch.setattr(ort, "get_available_providers", lambda: everything)
    chosen = providers_for(torch.device("cuda:1"), tmp_path)
    assert [p[0] for p in chosen] == ["TensorrtExecutionProvider", "CUDAExecutionProvider"]
    assert chosen[0][1]["trt_engine_cache_path"] == str(tmp_path / "tensorrt") and chosen[1][1]["device_id"] == "1"
    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CPUExecutionProvider"])
    with pytest.raises(ModelLoadError, match="no CUDA provider"):
        providers_for(torch.device("cuda"), tmp_path)


def test_openvino_sends_no_telemetry_and_starts_no_process(tmp_path: Path) -> None:
    """OpenVINO's usage telemetry is on by default (no opt-out file in a fresh home) and forks a process to
    send each event; the server must neither report home nor leave a child its exit waits for."""
    code = """
import multiprocessing, os
from server.settings import Settings
from server.runtimes.factory import create_runtime, importable
assert importable("openvino")
runtime = create_runtime(Settings(weights="random", max_size=32, runtime="openvino", precision="fp32",
                                  device="cpu", cache_dir=os.environ["CACHE"]).model_settings())
runtime.predict([__import__("numpy").zeros((32, 24, 3), "uint8")])
import openvino_telemetry.main as telemetry
print("consent", telemetry.Telemetry().consent, "children", len(multiprocessing.active_children()),
      "CI" in os.environ)
"""
    env = {k: v for k, v in os.environ.items() if k not in ("CI", "TF_BUILD", "JENKINS_URL")}
    env |= {"HOME": str(tmp_path), "CACHE": str(tmp_path / "cache"), "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().endswith("consent False children 0 False"), done.stdout
