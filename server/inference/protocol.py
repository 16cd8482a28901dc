"""segserve's models in the Open Inference Protocol, as values: their tensor contract, the request and
response types both doors convert to and from, model metadata and configuration, and the pure steps of an
inference (which images, which outputs, which options). The data plane (server/dataplane/) runs it.

Inputs: IMAGE (BYTES [N] or [N,1], encoded images) or PIXELS (UINT8 [N,H,W,3], RGB).
Parameters: max_size, overlay, overlay_opacity.
Outputs: MASK (UINT8 [N,H,W]), MASK_PNG (BYTES [N]), CLASSES (BYTES [N], JSON), OVERLAY_PNG (BYTES [N]).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from importlib import metadata
from typing import Any

import numpy as np

from server.core.types import SegmentOptions, SegmentResult
from server.errors import InvalidTensor, ModelControlRefused, TooManyImages
from server.inference import tensors
from server.inference.tensors import BYTES, InputTensor, Tensor
from server.labels import Label

MODEL_VERSION = "1"
PLATFORM = "segserve"
IMAGE, PIXELS = "IMAGE", "PIXELS"
MASK, MASK_PNG, CLASSES, OVERLAY_PNG = "MASK", "MASK_PNG", "CLASSES", "OVERLAY_PNG"
OUTPUTS = (MASK, MASK_PNG, CLASSES, OVERLAY_PNG)
PARAMETERS = ("max_size", "overlay", "overlay_opacity")
UNLOAD_PARAMETERS = ("unload_dependents",)
"""What tritonclient's unload_model sends; segserve's models have no dependents, so it changes nothing. A load
takes no parameter: Triton's `config` and `file:` ones would let a caller write a model, and segserve's
models come from the repository folder only."""
EXTENSIONS = ("model_configuration", "statistics", "model_repository", "binary_tensor_data")

ParameterValue = bool | int | float | str


@dataclass(frozen=True)
class TensorSpec:
    name: str
    datatype: str
    shape: tuple[int, ...]
    """With the batch dimension first; -1: any length."""
    optional: bool = False


INPUT_SPECS = (
    TensorSpec(IMAGE, BYTES, (-1, 1), optional=True),
    TensorSpec(PIXELS, "UINT8", (-1, -1, -1, 3), optional=True),
)
OUTPUT_SPECS = (
    TensorSpec(MASK_PNG, BYTES, (-1,)),
    TensorSpec(CLASSES, BYTES, (-1,)),
)
"""The model's outputs as ModelMetadata and ModelConfig list them: what a Segment call answers, and what a
request naming no outputs gets ("all outputs of the model", as the protocol says). Generic clients name
every listed output (perf_analyzer does), so what they measure is what a Segment call costs."""
EXTRA_OUTPUT_SPECS = (
    TensorSpec(MASK, "UINT8", (-1, -1, -1)),
    TensorSpec(OVERLAY_PNG, BYTES, (-1,)),
)
"""Outputs a request gets only by naming them: the raw full-size label map (12 MB for a 12 MP photo) and the
overlay (a full-size decode and blend). Listed in the metadata's and config's parameter `extra_outputs`."""


@dataclass(frozen=True)
class InferRequest:
    model_name: str
    model_version: str
    id: str
    inputs: list[InputTensor]
    """As the door parsed them, contents not yet decoded: images_of checks them against the limits first."""
    outputs: list[str] = field(default_factory=list)
    """Requested output names; empty: MASK_PNG, CLASSES, MASK when the images share a size, and
    OVERLAY_PNG when the overlay parameter asks."""
    parameters: Mapping[str, ParameterValue] = field(default_factory=dict)


@dataclass(frozen=True)
class ModelDescription:
    """What ModelMetadata and ModelConfig say of one model, built once by the data plane; each door only
    serialises it (with the tensor specs above, which are the same for every model)."""

    name: str
    labels: tuple[Label, ...]
    max_batch_size: int
    """Triton's max_batch_size: the most images one request may carry (the admission queue's size)."""
    preferred_batch_size: int
    max_queue_delay_us: int


@dataclass(frozen=True)
class InferResponse:
    model_name: str
    model_version: str
    id: str
    outputs: list[Tensor]
    results: list[SegmentResult]


def images_of(inputs: list[InputTensor], max_images: int) -> list[bytes | np.ndarray]:
    """The request's images: the elements of IMAGE, or the frames of PIXELS; at most `max_images` of them
    (SEGSERVE_MAX_QUEUE, Triton's max_batch_size).

    Both doors' requests come here undecoded, and everything a shape can say is checked from the shape
    alone, with Python ints, before any element, array or image is built: a zero-sized image (INVALID_ARGUMENT
    whatever N is), the batch size N (a PIXELS tensor [N,1,1,3] or an IMAGE [N] declares N images in a few
    bytes, and each would cost the server an object), then the elements against the bytes actually sent
    (tensors.decode). So a refusal costs what the request's bytes cost, never what its shape declares."""
    names = [tensor.name for tensor in inputs]
    unknown = [name for name in names if name not in (IMAGE, PIXELS)]
    if unknown:
        raise InvalidTensor(f"unknown input {unknown[0]!r}; the inputs are IMAGE (BYTES) or PIXELS (UINT8)")
    if len(inputs) != 1:
        raise InvalidTensor(f"send exactly one input, IMAGE or PIXELS; got {len(inputs)} ({', '.join(names)})")
    tensor = inputs[0]
    shape = tensors.check_shape(tensor.name, tensor.shape)
    if tensor.name == IMAGE:
        if tensor.datatype != BYTES:
            raise InvalidTensor(f"IMAGE must be BYTES, got {tensor.datatype}")
        if len(shape) not in (1, 2) or (len(shape) == 2 and shape[1] != 1):
            raise InvalidTensor(f"IMAGE must have shape [N] or [N,1], got {list(shape)}")
    else:
        if tensor.datatype != "UINT8":
            raise InvalidTensor(f"PIXELS must be UINT8, got {tensor.datatype}")
        if len(shape) != 4 or shape[3] != 3:
            raise InvalidTensor(f"PIXELS must have shape [N,H,W,3] (RGB), got {list(shape)}")
        if 0 in shape[1:3]:  # malformed whatever N is, so INVALID_ARGUMENT before the batch size is judged
            raise InvalidTensor(
                f"PIXELS of shape {list(shape)} hold images of {shape[2]}x{shape[1]} pixels; "
                "each side must be at least 1"
            )
    count = shape[0]
    if count == 0:
        raise InvalidTensor(f"{tensor.name} holds no images (N is 0)")
    if count > max_images:
        raise TooManyImages(
            f"{count} images in one request can never fit the queue of {max_images} (SEGSERVE_MAX_QUEUE); "
            f"send at most {max_images} per request"
        )
    data = tensors.decode(tensor)
    if isinstance(data, list):
        return list(data)
    # Every dimension is now at least 1 and their product is the number of elements received: a safe reshape.
    return list(data.reshape(shape))


def requested_outputs(request: InferRequest) -> list[str]:
    for name in request.outputs:
        if name not in OUTPUTS:
            raise InvalidTensor(f"unknown output {name!r}; the outputs are {', '.join(OUTPUTS)}")
    if request.outputs:
        wanted = list(dict.fromkeys(request.outputs))
        if request.parameters.get("overlay") is False and OVERLAY_PNG in wanted:
            # Generic clients (perf_analyzer) name every output the model lists; overlay=false leaves out the
            # one that costs a full-size decode and blend, so they can measure what a Segment call does.
            wanted.remove(OVERLAY_PNG)
        return wanted
    wanted = [MASK_PNG, CLASSES]
    if request.parameters.get("overlay") is True:
        wanted.append(OVERLAY_PNG)
    return wanted


def _parameter(parameters: Mapping[str, ParameterValue], name: str, kind: type) -> ParameterValue | None:
    value = parameters.get(name)
    if value is None:
        return None
    # bool is an int in Python; an int is accepted where a float is asked.
    ok = isinstance(value, bool) if kind is bool else (isinstance(value, kind | int) and not isinstance(value, bool))
    if not ok:
        raise InvalidTensor(f"parameter {name} must be {kind.__name__}, got {value!r}")
    return value


def options_of(parameters: Mapping[str, ParameterValue], wanted: list[str]) -> SegmentOptions:
    _parameter(parameters, "overlay", bool)  # read by requested_outputs; its type is checked here
    max_size = _parameter(parameters, "max_size", int)
    opacity = _parameter(parameters, "overlay_opacity", float)
    return SegmentOptions(
        max_size=int(max_size or 0),
        overlay=OVERLAY_PNG in wanted,
        overlay_opacity=None if opacity is None else float(opacity),
        mask_png=MASK_PNG in wanted,
        label_map=MASK in wanted,
    )


def check_mask_sizes(wanted: list[str], sizes: list[tuple[int, int]]) -> None:
    """MASK is one [N,H,W] tensor: refused, before any model work, for images of different sizes."""
    if MASK in wanted and len(set(sizes)) > 1:
        seen = ", ".join(f"{w}x{h}" for w, h in dict.fromkeys(sizes))
        raise InvalidTensor(
            f"MASK needs the request's images to share one size (they are {seen}); ask for MASK_PNG instead"
        )


def output_tensor(name: str, results: list[SegmentResult]) -> Tensor:
    n = len(results)
    if name == MASK:
        check_mask_sizes([MASK], [(r.width, r.height) for r in results])  # checked before the model already
        height, width = results[0].height, results[0].width
        maps = [r.label_map for r in results if r.label_map is not None]
        return Tensor(MASK, "UINT8", (n, height, width), np.stack(maps).reshape(-1))
    if name == MASK_PNG:
        return Tensor(MASK_PNG, BYTES, (n,), [r.mask_png for r in results])
    if name == OVERLAY_PNG:
        return Tensor(OVERLAY_PNG, BYTES, (n,), [r.overlay_png or b"" for r in results])
    return Tensor(CLASSES, BYTES, (n,), [classes_json(r) for r in results])


def server_version() -> str:
    try:
        return metadata.version("segserve")
    except metadata.PackageNotFoundError:
        return "unknown"


def classes_json(result: SegmentResult) -> bytes:
    shares = [{"index": c.index, "name": c.name, "fraction": c.fraction} for c in result.classes]
    return json.dumps(shares, separators=(",", ":")).encode()


def labels_json(labels: tuple[Label, ...]) -> str:
    """The model's classes as the "labels" parameter of ModelMetadata and ModelConfig carries them."""
    return json.dumps(labels_list(labels), separators=(",", ":"))


def extra_outputs_list() -> list[dict[str, Any]]:
    return [{"name": s.name, "datatype": s.datatype, "shape": list(s.shape)} for s in EXTRA_OUTPUT_SPECS]


def extra_outputs_json() -> str:
    """The extra outputs' metadata as the parameter `extra_outputs` carries it (JSON text, as `labels`)."""
    return json.dumps(extra_outputs_list(), separators=(",", ":"))


def labels_list(labels: tuple[Label, ...]) -> list[dict[str, Any]]:
    return [{"index": label.index, "name": label.name, "color": label.hex_color} for label in labels]


def check_control_parameters(parameters: Mapping[str, object], allowed: tuple[str, ...]) -> None:
    for key in parameters:
        if key not in allowed:
            raise ModelControlRefused(
                f"parameter {key!r} is not taken: segserve loads each model's config and files from its "
                "repository folder, by name"
            )
