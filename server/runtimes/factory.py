"""The one place that decides which runtime serves: SEGSERVE_RUNTIME, the device and what is installed."""

from __future__ import annotations

import importlib
import logging
from pathlib import Path

import torch

from server.errors import ModelLoadError
from server.labels import VOC_CLASSES, Label, make_labels
from server.runtimes import cpu_features, progress, selection
from server.runtimes.base import ModelFacts, Runtime
from server.runtimes.export_cache import cached_file, resolve_cache_root, source_sha256
from server.runtimes.openvino_import import import_openvino
from server.runtimes.weights import LoadedModel, load_model, resolve_device, weights_fingerprint, without_aux_head
from server.settings import ModelSettings

log = logging.getLogger(__name__)

GRAPH_RUNTIMES = ("onnxruntime", "openvino")


def importable(name: str) -> bool:
    try:
        import_openvino() if name == "openvino" else importlib.import_module(name)
    except Exception:  # a broken install (missing shared library...) is as good as absent
        return False
    return True


def check_installed(requested: str) -> None:
    """A runtime asked for by name that cannot run here is a one-line ModelLoadError."""
    if requested not in ("auto", "torch") and not importable(requested):
        raise ModelLoadError(
            f"runtime {requested} asked for (SEGSERVE_RUNTIME), but {requested} is not installed: "
            f"pip install {requested}, or use SEGSERVE_RUNTIME=auto"
        )


def plan(settings: ModelSettings, device: torch.device) -> list[selection.Candidate]:
    """What auto compares for these settings on this device (one candidate when both are named)."""
    check_installed(settings.runtime)
    return selection.candidates(
        settings.runtime,
        settings.precision,
        device,
        installed=selection.installed,
        native_bf16=cpu_features.native_bf16() if device.type == "cpu" else torch.cuda.is_bf16_supported(),
        native_int8=device.type == "cpu" and cpu_features.native_int8(),
    )


def facts_of(settings: ModelSettings, loaded: LoadedModel, labels: tuple[Label, ...] | None = None) -> ModelFacts:
    return ModelFacts(settings.model, loaded.weights_description, loaded.trained, labels or make_labels(VOC_CLASSES))


def graph_key(
    settings: ModelSettings, loaded: LoadedModel, weights_sha256: str, runtime: str, precision: str
) -> dict[str, str]:
    from server.runtimes import calibration, graph_export, int8

    key = {
        "model": settings.model,
        "weights_sha256": weights_sha256,
        "mean_std": repr((loaded.mean, loaded.std)),
        "torch": torch.__version__,
        "onnx": selection.library_version("onnx"),
        # The export code itself, hashed: an edit to it can never be served from a graph the old code made.
        "export_code_sha256": source_sha256(graph_export.__file__),
        "opset": str(graph_export.OPSET),
        "runtime": f"{runtime} {selection.library_version(runtime)}",
        "precision": precision,
    }
    if precision == "int8":
        key |= {
            "int8_code_sha256": source_sha256(int8.__file__),
            "calibration_code_sha256": source_sha256(calibration.__file__),
            "calibration_size": str(settings.max_size),
        }
        if runtime == "openvino":
            key["nncf"] = selection.library_version("nncf")
    return key


def exported_graph(
    settings: ModelSettings,
    loaded: LoadedModel,
    runtime: str,
    precision: str,
    weights_sha256: str,
    *,
    rebuild: bool = False,
) -> Path:
    """The cached graph for these weights and this runtime, exported (and quantized) when not cached."""
    from server.runtimes import int8
    from server.runtimes.graph_export import export_onnx

    root = resolve_cache_root(settings.cache_dir)
    fp32_key = graph_key(settings, loaded, weights_sha256, runtime, "fp32")

    def export(out: Path) -> None:
        progress.report(f"exporting the {runtime} graph (not cached yet)")
        export_onnx(loaded, out)

    fp32 = cached_file(root, settings.model, ".onnx", fp32_key, export, rebuild=rebuild)
    if precision != "int8":
        return fp32  # bf16 is the runtime's own lowering of the fp32 graph, at compile time
    int8_key = graph_key(settings, loaded, weights_sha256, runtime, "int8")

    def quantize(out: Path) -> None:
        progress.report(f"quantizing the {runtime} graph to int8 (not cached yet; tens of seconds)")
        if runtime == "openvino":
            int8.quantize_openvino(fp32, out, settings.max_size)
        else:
            int8.quantize_onnxruntime(fp32, out, settings.max_size)

    # openvino's is its own IR (int8.read_packed), not an ONNX graph
    suffix = int8.PACKED_SUFFIX if runtime == "openvino" else ".onnx"
    return cached_file(root, f"{settings.model}-int8", suffix, int8_key, quantize, rebuild=rebuild)


def _graph_runtime(
    settings: ModelSettings, graph: Path, facts: ModelFacts, device: torch.device, candidate: selection.Candidate
) -> Runtime:
    if candidate.runtime == "onnxruntime":
        from server.runtimes.onnxruntime_runtime import OnnxRuntimeRuntime

        root = resolve_cache_root(settings.cache_dir)
        return OnnxRuntimeRuntime(
            graph,
            facts,
            device,
            precision=candidate.precision,
            threads=settings.inference_threads,
            cache_root=root,
            instances=settings.model_instances,
        )
    from server.runtimes.openvino_runtime import OpenVinoRuntime

    return OpenVinoRuntime(
        graph,
        facts,
        device,
        precision=candidate.precision,
        threads=settings.inference_threads,
        instances=settings.model_instances,
    )


def build_runtime(
    settings: ModelSettings,
    loaded: LoadedModel,
    device: torch.device,
    candidate: selection.Candidate,
    weights_sha256: str,
    labels: tuple[Label, ...] | None = None,
) -> Runtime:
    """One runtime at one precision, from loaded weights. Raises ModelLoadError with one line."""
    facts = facts_of(settings, loaded, labels)
    name, precision = candidate.runtime, candidate.precision
    if precision == "int8" and name not in GRAPH_RUNTIMES:
        raise ModelLoadError(f"precision int8 is offered by the onnxruntime and openvino runtimes, not {name}")
    if name == "torch":
        if settings.model_instances > 1:
            # Its intra-op threads are one pool for the whole process (and a captured graph one replay at a
            # time): a second call at once would share the first's threads, not get its own.
            raise ModelLoadError(
                "SEGSERVE_MODEL_INSTANCES above 1 is offered by the onnxruntime and openvino runtimes, not torch"
            )
        from server.runtimes.torch_eager import TorchRuntime

        return TorchRuntime(
            loaded,
            facts,
            device,
            precision=precision,
            channels_last=settings.channels_last,
            capture=settings.capture,
        )
    if settings.capture:
        raise ModelLoadError(f"SEGSERVE_CAPTURE is a torch runtime option; the {name} runtime does not offer it")
    if precision == "fp16" or (precision == "bf16" and name != "openvino"):
        raise ModelLoadError(
            f"precision {precision} is offered by torch on CUDA (and bf16 by openvino on the CPU), not by {name}"
        )
    graph = exported_graph(settings, loaded, name, precision, weights_sha256)
    try:
        return _graph_runtime(settings, graph, facts, device, candidate)
    except ModelLoadError:
        raise
    except Exception as exc:
        # The file verified against its record but the runtime refused it: rebuild once rather than trust it.
        log.warning(
            "%s could not load %s (%s); exporting again", name, graph, str(exc).splitlines()[0] if str(exc) else exc
        )
        graph = exported_graph(settings, loaded, name, precision, weights_sha256, rebuild=True)
        return _graph_runtime(settings, graph, facts, device, candidate)


def create_runtime(settings: ModelSettings, labels: tuple[Label, ...] | None = None) -> Runtime:
    """Loads the weights and builds the runtime the settings ask for, with one output class per label (VOC's 21
    when None); with runtime or precision auto, the fastest that passes the agreement check
    (server/runtimes/selection.py). Raises ModelLoadError with one line."""
    device = resolve_device(settings.device)
    found = plan(settings, device)
    if settings.inference_threads:
        torch.set_num_threads(settings.inference_threads)  # the export runs on torch too
    progress.report("loading the weights")
    loaded = load_model(settings.model, settings.weights, len(labels or VOC_CLASSES))
    weights_sha256 = weights_fingerprint(without_aux_head(loaded.module))
    key = selection.cache_key(
        model=settings.model,
        weights_sha256=weights_sha256,
        max_size=settings.max_size,
        threads=settings.inference_threads or torch.get_num_threads(),
        instances=settings.model_instances,
        device=device,
        found=found,
    )
    runtime, choice = selection.choose(
        found,
        lambda candidate: build_runtime(settings, loaded, device, candidate, weights_sha256, labels),
        max_size=settings.max_size,
        cache_root=resolve_cache_root(settings.cache_dir),
        key=key,
    )
    runtime.description += choice.summary()
    return runtime
