"""The torch runtime: the torchvision module itself, eager (or compiled per shape on CUDA)."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from server.errors import ModelLoadError
from server.runtimes.base import ModelFacts
from server.runtimes.weights import LoadedModel, without_aux_head

log = logging.getLogger(__name__)

TORCH_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


class TorchRuntime:
    def __init__(
        self,
        loaded: LoadedModel,
        facts: ModelFacts,
        device: torch.device,
        *,
        precision: str = "fp32",
        channels_last: bool = True,
        capture: bool = False,
    ) -> None:
        if precision not in TORCH_DTYPES:
            raise ModelLoadError(f"precision {precision} is not offered by the torch runtime: use fp32, fp16 or bf16")
        if precision != "fp32" and device.type != "cuda":
            # On this kind of CPU half precision runs slower than fp32 (no native fp16/bf16 units), so not offered.
            raise ModelLoadError(
                f"precision {precision} needs a CUDA device; on the CPU use fp32 (or int8 with onnxruntime)"
            )
        if capture and device.type != "cuda":
            raise ModelLoadError("SEGSERVE_CAPTURE needs a CUDA device (it captures CUDA graphs per shape)")
        self.facts = facts
        self.device = device
        self.precision = precision
        self.dtype = TORCH_DTYPES[precision]
        self.channels_last = channels_last
        module = without_aux_head(loaded.module).eval().to(device, dtype=self.dtype)
        if channels_last:
            module = module.to(memory_format=torch.channels_last)
        self.module = module
        self._forward: Callable[[torch.Tensor], Any] = module
        if capture:
            # reduce-overhead: CUDA graphs, one per input shape; dynamic=False keeps one graph per shape bucket.
            self._forward = torch.compile(module, mode="reduce-overhead", dynamic=False)
        self._mean = torch.tensor(loaded.mean, device=device).view(1, 3, 1, 1)
        self._std = torch.tensor(loaded.std, device=device).view(1, 3, 1, 1)
        layout = ", channels_last" if channels_last else ""
        captured = ", CUDA graphs per shape" if capture else ""
        threads_used = f", {torch.get_num_threads()} threads" if device.type == "cpu" else ""
        self.description = f"torch {torch.__version__} eager ({device}, {precision}{layout}{captured}{threads_used})"

    @property
    def device_name(self) -> str:
        return str(self.device)

    def predict(self, images: list[np.ndarray]) -> list[np.ndarray]:
        if not images:
            return []
        batch = torch.from_numpy(np.stack(images)).to(self.device, non_blocking=True)
        with torch.inference_mode():
            x = batch.permute(0, 3, 1, 2).float().div_(255.0)
            x = ((x - self._mean) / self._std).to(self.dtype)
            if self.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            logits = self._forward(x)["out"]
            labels = logits.argmax(dim=1).to(torch.uint8)
        return list(labels.cpu().numpy())
