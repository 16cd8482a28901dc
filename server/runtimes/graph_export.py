"""The ONNX graph every non-torch runtime runs: exported from the same torchvision module and weights.

The graph takes uint8 NHWC images and returns uint8 NHW labels: normalisation and argmax live inside it,
so the runtime does the layout change, scaling and the 21-channel argmax in its own fused kernels, and a
batch crosses the Python boundary as bytes, not as 21 float maps. Batch, height and width are dynamic.
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import torch
from torch import nn

from server.runtimes.weights import LoadedModel, without_aux_head

log = logging.getLogger(__name__)

OPSET = 17
INPUT_NAME = "images"
OUTPUT_NAME = "labels"


class LabelsGraph(nn.Module):
    """uint8 (N, H, W, 3) RGB -> uint8 (N, H, W) class indices."""

    mean: torch.Tensor
    std: torch.Tensor

    def __init__(self, loaded: LoadedModel) -> None:
        super().__init__()
        self.model = without_aux_head(loaded.module).eval()
        # Folding /255 into mean and std saves one pass over the image.
        self.register_buffer("mean", torch.tensor(loaded.mean).view(1, 3, 1, 1) * 255.0)
        self.register_buffer("std", torch.tensor(loaded.std).view(1, 3, 1, 1) * 255.0)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images.permute(0, 3, 1, 2).float()
        x = (x - self.mean) / self.std
        labels: torch.Tensor = self.model(x)["out"].argmax(dim=1).to(torch.uint8)
        return labels


def export_onnx(loaded: LoadedModel, path: Path) -> None:
    """Writes the graph to `path` (one file, weights included)."""
    graph = LabelsGraph(loaded).to("cpu", dtype=torch.float32)
    # Two images, not one: an example batch of 1 would let the tracer treat the batch size as a constant.
    example = torch.zeros((2, 96, 128, 3), dtype=torch.uint8)
    with torch.inference_mode(False), torch.no_grad(), warnings.catch_warnings():
        # The TorchScript exporter is deprecated, but it exports this model in about a second where the
        # torch.export-based one takes close to a minute on two cores; start-up time is what matters here.
        warnings.simplefilter("ignore")
        torch.onnx.export(
            graph,
            (example,),
            str(path),
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            dynamic_axes={
                INPUT_NAME: {0: "batch", 1: "height", 2: "width"},
                OUTPUT_NAME: {0: "batch", 1: "height", 2: "width"},
            },
            opset_version=OPSET,
            dynamo=False,
        )
