"""The OpenVINO runtime: the exported graph compiled for the CPU, tuned for latency."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import openvino as ov
import torch

from server.errors import ModelLoadError
from server.runtimes.base import ModelFacts
from server.runtimes.onnxruntime_runtime import cpu_threads


class OpenVinoRuntime:
    def __init__(self, graph: Path, facts: ModelFacts, device: torch.device, *, precision: str, threads: int) -> None:
        if device.type != "cpu":
            raise ModelLoadError("the openvino runtime runs on the CPU only here: set SEGSERVE_DEVICE=cpu")
        self.facts = facts
        self.device = device
        threads = cpu_threads(threads)
        core = ov.Core()
        config = {
            "PERFORMANCE_HINT": "LATENCY",
            "INFERENCE_NUM_THREADS": threads,
            # f32 everywhere: on CPUs with bf16 units OpenVINO would otherwise lower precision by itself.
            "INFERENCE_PRECISION_HINT": "f32",
        }
        self.compiled = core.compile_model(str(graph), "CPU", config)
        self.request = self.compiled.create_infer_request()
        self.description = f"openvino {ov.get_version().split('-')[0]} (CPU, {precision}, {threads} threads)"

    @property
    def device_name(self) -> str:
        return str(self.device)

    def predict(self, images: list[np.ndarray]) -> list[np.ndarray]:
        if not images:
            return []
        self.request.infer({0: np.stack(images)})
        return list(np.asarray(self.request.get_output_tensor(0).data).copy())
