"""The OpenVINO runtime: the exported graph compiled for the CPU, tuned for latency."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from server.runtimes.openvino_import import telemetry_declined

with telemetry_declined():
    import openvino as ov

from server.errors import ModelLoadError
from server.runtimes.base import InstancePool, ModelFacts
from server.runtimes.int8 import PACKED_SUFFIX, read_packed
from server.runtimes.onnxruntime_runtime import cpu_threads, threads_per_instance

# int8: NNCF's quantized model (server/runtimes/int8.py); its quantized operations run in int8 and the rest
# in bf16 where the CPU computes bf16 natively (elsewhere OpenVINO takes the bf16 hint as f32): an f32 hint
# puts f32 reorders between the int8 kernels, and int8 then no longer pays (docs/performance.md).
HINTS = {"fp32": "f32", "bf16": "bf16", "int8": "bf16"}


def compiled_precision(compiled: ov.CompiledModel) -> str:
    """The precision a compiled model computes in, OpenVINO's short name ("f32", "bf16"). The property is an
    ov.Type, whose str() is "<Type: 'bfloat16'>": a test of "bf16" in it found f32 on every CPU."""
    return str(compiled.get_property("INFERENCE_PRECISION_HINT").get_type_name())


class OpenVinoRuntime:
    def __init__(
        self, graph: Path, facts: ModelFacts, device: torch.device, *, precision: str, threads: int, instances: int = 1
    ) -> None:
        if device.type != "cpu":
            raise ModelLoadError("the openvino runtime runs on the CPU only here: set SEGSERVE_DEVICE=cpu")
        if precision not in HINTS:
            raise ModelLoadError(f"precision {precision} is not offered by openvino: use fp32, bf16 or int8")
        self.facts = facts
        self.precision = precision
        self.device = device
        threads = threads_per_instance(cpu_threads(threads), instances) * instances
        core = ov.Core()
        config = {
            # One instance: one stream with every thread, the shortest time for a lone request. Several:
            # one stream per instance, each with its share of the threads, so that batches run side by side.
            "PERFORMANCE_HINT": "LATENCY" if instances == 1 else "THROUGHPUT",
            "NUM_STREAMS": instances,
            "INFERENCE_NUM_THREADS": threads,
            # Always explicit: left alone, OpenVINO lowers to bf16 by itself on CPUs with bf16 units, and
            # which precision serves is auto's decision (checked against fp32), not the library's.
            "INFERENCE_PRECISION_HINT": HINTS[precision],
        }
        model = read_packed(core, graph) if graph.suffix == PACKED_SUFFIX else str(graph)
        self.compiled = core.compile_model(model, "CPU", config)
        self.engines = InstancePool(self.compiled.create_infer_request() for _ in range(instances))
        # A CPU without bf16 units ignores the bf16 hint and compiles f32: say what runs, not what was asked.
        if precision == "bf16" and compiled_precision(self.compiled) != "bf16":
            self.precision = "fp32"
            precision = "bf16 asked, f32 runs: no bf16 units"
        elif precision == "int8":
            precision = f"int8, the rest in {compiled_precision(self.compiled)}"
        streams = f", {instances} instances" if instances > 1 else ""
        self.description = f"openvino {ov.get_version().split('-')[0]} (CPU, {precision}, {threads} threads{streams})"

    @property
    def device_name(self) -> str:
        return str(self.device)

    def predict(self, images: list[np.ndarray]) -> list[np.ndarray]:
        if not images:
            return []
        with self.engines.take() as request:
            request.infer({0: np.stack(images)})
            return list(np.asarray(request.get_output_tensor(0).data).copy())
