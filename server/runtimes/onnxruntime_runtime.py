"""The ONNX Runtime runtime: the exported graph on the CPU provider (CUDA and TensorRT providers when present)."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

from server.errors import ModelLoadError
from server.runtimes.base import InstancePool, ModelFacts
from server.runtimes.graph_export import INPUT_NAME

log = logging.getLogger(__name__)


def cpu_threads(requested: int) -> int:
    return requested or os.cpu_count() or 1


def threads_per_instance(threads: int, instances: int) -> int:
    """Each instance's share of the inference threads; at least one each, or a one-line error."""
    if instances > threads:
        raise ModelLoadError(
            f"SEGSERVE_MODEL_INSTANCES={instances} is more than the {threads} inference threads to share among them"
        )
    return threads // instances


def session_options(threads: int) -> ort.SessionOptions:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.intra_op_num_threads = threads
    # The graph is one chain: a second pool of inter-op threads would only compete for the cores.
    options.inter_op_num_threads = 1
    # Idle intra-op threads spin by default, burning the cores that the decode and encode pool needs
    # between model calls; on a machine of few cores that costs more than the wake-up saves.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return options


def providers_for(device: torch.device, cache_root: Path) -> list[str | tuple[str, dict[str, str]]]:
    """CPU: the CPU provider. CUDA: TensorRT (engines cached beside the graph) when present, then CUDA."""
    if device.type != "cuda":
        return ["CPUExecutionProvider"]
    available = ort.get_available_providers()
    if "CUDAExecutionProvider" not in available:
        raise ModelLoadError(
            "onnxruntime has no CUDA provider here (install onnxruntime-gpu) - use SEGSERVE_RUNTIME=torch on CUDA"
        )
    index = str(device.index or 0)
    chosen: list[str | tuple[str, dict[str, str]]] = []
    if "TensorrtExecutionProvider" in available:
        (cache_root / "tensorrt").mkdir(parents=True, exist_ok=True)
        chosen.append(
            (
                "TensorrtExecutionProvider",
                {
                    "device_id": index,
                    "trt_engine_cache_enable": "True",
                    "trt_engine_cache_path": str(cache_root / "tensorrt"),
                },
            )
        )
    chosen.append(("CUDAExecutionProvider", {"device_id": index}))
    return chosen


class OnnxRuntimeRuntime:
    def __init__(
        self,
        graph: Path,
        facts: ModelFacts,
        device: torch.device,
        *,
        precision: str,
        threads: int,
        cache_root: Path,
        instances: int = 1,
    ) -> None:
        self.facts = facts
        self.device = device
        self.precision = precision
        self.graph = graph
        each = threads_per_instance(cpu_threads(threads), instances)
        # One session per instance: a session's intra-op pool is its own, so calls on separate sessions
        # never wait for each other's threads (the weights are held once per session).
        self.engines = InstancePool(
            ort.InferenceSession(str(graph), session_options(each), providers=providers_for(device, cache_root))
            for _ in range(instances)
        )
        with self.engines.take() as session:
            used = session.get_providers()
        on_cpu = f", {each * instances} threads" if device.type == "cpu" else ""
        several = f", {instances} instances" if instances > 1 else ""
        self.description = f"onnxruntime {ort.__version__} ({used[0]}, {precision}{on_cpu}{several})"

    @property
    def device_name(self) -> str:
        return str(self.device)

    def predict(self, images: list[np.ndarray]) -> list[np.ndarray]:
        if not images:
            return []
        with self.engines.take() as session:
            (labels,) = session.run(None, {INPUT_NAME: np.stack(images)})
        return list(labels)
