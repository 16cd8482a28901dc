"""The one place that decides which runtime serves: SEGSERVE_RUNTIME, the device and what is installed."""

from __future__ import annotations

import functools
import hashlib
import importlib
import logging
from pathlib import Path

import torch

from server.errors import ModelLoadError
from server.labels import VOC_CLASSES, Label, make_labels
from server.model import LoadedModel, load_model, resolve_device, weights_fingerprint, without_aux_head
from server.runtimes.base import ModelFacts, Runtime
from server.runtimes.export_cache import cached_file, resolve_cache_root
from server.settings import Settings

log = logging.getLogger(__name__)

GRAPH_RUNTIMES = ("onnxruntime", "openvino")
CPU_PREFERENCE = ("onnxruntime", "openvino")
"""auto on the CPU: the first of these that imports. onnxruntime first: it measured faster on this CPU kind
(384x512, 2 threads: 79 vs 83 ms per image in issue 12; 167 vs 185 ms at batch 1 and 172 vs 203 at batch 4
measured interleaved on a busy machine while building this; bench.run measures both on each machine).
On CUDA auto is torch."""


def importable(name: str) -> bool:
    try:
        importlib.import_module(name)
    except Exception:  # a broken install (missing shared library...) is as good as absent
        return False
    return True


def choose_runtime(requested: str, device: torch.device, precision: str) -> str:
    """The runtime to use; a runtime asked for by name that cannot run here is a one-line ModelLoadError."""
    if requested != "auto":
        if requested != "torch" and not importable(requested):
            raise ModelLoadError(
                f"runtime {requested} asked for (SEGSERVE_RUNTIME), but {requested} is not installed: "
                f"pip install {requested}, or use SEGSERVE_RUNTIME=auto"
            )
        return requested
    if precision == "int8":
        if importable("onnxruntime"):
            return "onnxruntime"
        raise ModelLoadError("precision int8 needs onnxruntime, which is not installed")
    if device.type == "cuda" or precision in ("fp16", "bf16"):
        return "torch"
    return next((name for name in CPU_PREFERENCE if importable(name)), "torch")


def facts_of(settings: Settings, loaded: LoadedModel, labels: tuple[Label, ...] | None = None) -> ModelFacts:
    return ModelFacts(settings.model, loaded.weights_description, loaded.trained, labels or make_labels(VOC_CLASSES))


@functools.cache
def source_sha256(path: str) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]


@functools.cache
def _library_version(name: str) -> str:
    return str(importlib.import_module(name).__version__) if name != "openvino" else _openvino_version()


def _openvino_version() -> str:
    import openvino

    return str(openvino.get_version())


def graph_key(
    settings: Settings, loaded: LoadedModel, weights_sha256: str, runtime: str, precision: str
) -> dict[str, str]:
    from server.runtimes import graph_export, int8

    key = {
        "model": settings.model,
        "weights_sha256": weights_sha256,
        "mean_std": repr((loaded.mean, loaded.std)),
        "torch": torch.__version__,
        "onnx": _library_version("onnx"),
        # The export code itself, hashed: an edit to it can never be served from a graph the old code made.
        "export_code_sha256": source_sha256(graph_export.__file__),
        "opset": str(graph_export.OPSET),
        "runtime": f"{runtime} {_library_version(runtime)}",
        "precision": precision,
    }
    if precision == "int8":
        key |= {"int8_code_sha256": source_sha256(int8.__file__), "calibration_size": str(settings.max_size)}
    return key


def exported_graph(settings: Settings, loaded: LoadedModel, runtime: str, *, rebuild: bool = False) -> Path:
    """The cached graph for these weights and this runtime, exported (and quantized) when not cached."""
    from server.runtimes.graph_export import export_onnx
    from server.runtimes.int8 import quantize_int8

    root = resolve_cache_root(settings.cache_dir)
    weights_sha256 = weights_fingerprint(without_aux_head(loaded.module))
    fp32_key = graph_key(settings, loaded, weights_sha256, runtime, "fp32")
    fp32 = cached_file(root, settings.model, ".onnx", fp32_key, lambda out: export_onnx(loaded, out), rebuild=rebuild)
    if settings.precision != "int8":
        return fp32
    int8_key = graph_key(settings, loaded, weights_sha256, runtime, "int8")
    return cached_file(
        root,
        f"{settings.model}-int8",
        ".onnx",
        int8_key,
        lambda out: quantize_int8(fp32, out, settings.max_size),
        rebuild=rebuild,
    )


def _graph_runtime(settings: Settings, graph: Path, facts: ModelFacts, device: torch.device, name: str) -> Runtime:
    if name == "onnxruntime":
        from server.runtimes.onnxruntime_runtime import OnnxRuntimeRuntime

        root = resolve_cache_root(settings.cache_dir)
        return OnnxRuntimeRuntime(
            graph, facts, device, precision=settings.precision, threads=settings.inference_threads, cache_root=root
        )
    from server.runtimes.openvino_runtime import OpenVinoRuntime

    return OpenVinoRuntime(graph, facts, device, precision=settings.precision, threads=settings.inference_threads)


def create_runtime(settings: Settings, labels: tuple[Label, ...] | None = None) -> Runtime:
    """Loads the weights and builds the runtime the settings ask for, with one output class per label (VOC's
    21 when None). Raises ModelLoadError with one line."""
    device = resolve_device(settings.device)
    name = choose_runtime(settings.runtime, device, settings.precision)
    if settings.precision == "int8" and name != "onnxruntime":
        raise ModelLoadError(f"precision int8 is offered by the onnxruntime runtime only, not {name}")
    if settings.inference_threads:
        torch.set_num_threads(settings.inference_threads)  # the export runs on torch too
    loaded = load_model(settings.model, settings.weights, len(labels or VOC_CLASSES))
    facts = facts_of(settings, loaded, labels)
    if name == "torch":
        from server.runtimes.torch_eager import TorchRuntime

        return TorchRuntime(
            loaded,
            facts,
            device,
            precision=settings.precision,
            channels_last=settings.channels_last,
            capture=settings.capture,
        )
    if settings.capture:
        raise ModelLoadError(f"SEGSERVE_CAPTURE is a torch runtime option; the {name} runtime does not offer it")
    if settings.precision in ("fp16", "bf16"):
        raise ModelLoadError(f"precision {settings.precision} is a torch-on-CUDA option; use SEGSERVE_RUNTIME=torch")
    graph = exported_graph(settings, loaded, name)
    try:
        return _graph_runtime(settings, graph, facts, device, name)
    except ModelLoadError:
        raise
    except Exception as exc:
        # The file verified against its record but the runtime refused it: rebuild once rather than trust it.
        log.warning(
            "%s could not load %s (%s); exporting again", name, graph, str(exc).splitlines()[0] if str(exc) else exc
        )
        graph = exported_graph(settings, loaded, name, rebuild=True)
        return _graph_runtime(settings, graph, facts, device, name)
