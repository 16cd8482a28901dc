"""DeepLabV3 weights: building the torchvision module, the pretrained/random/file fallbacks, a fingerprint.

Every runtime (server/runtimes/) starts from the module loaded here. Knows torch, never protobuf."""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torchvision.models import segmentation as tvseg

from server.errors import ModelLoadError
from server.labels import VOC_CLASSES

log = logging.getLogger(__name__)

_BUILDERS: dict[str, tuple[Callable[..., nn.Module], Any]] = {
    "deeplabv3_mobilenet_v3_large": (
        tvseg.deeplabv3_mobilenet_v3_large,
        tvseg.DeepLabV3_MobileNet_V3_Large_Weights.COCO_WITH_VOC_LABELS_V1,
    ),
    "deeplabv3_resnet50": (tvseg.deeplabv3_resnet50, tvseg.DeepLabV3_ResNet50_Weights.COCO_WITH_VOC_LABELS_V1),
    "deeplabv3_resnet101": (tvseg.deeplabv3_resnet101, tvseg.DeepLabV3_ResNet101_Weights.COCO_WITH_VOC_LABELS_V1),
}

# torchvision's weights transforms normalise with these (ImageNet statistics).
_DEFAULT_MEAN = (0.485, 0.456, 0.406)
_DEFAULT_STD = (0.229, 0.224, 0.225)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise ModelLoadError(f"unknown device {name!r}: use auto, cpu, cuda or cuda:N") from exc
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError(f"device {name!r} asked for, but CUDA is not available on this machine")
    return device


def _normalisation(weights_enum: Any) -> tuple[tuple[float, ...], tuple[float, ...]]:
    try:
        transform = weights_enum.transforms()
        return tuple(transform.mean), tuple(transform.std)
    except Exception:
        return _DEFAULT_MEAN, _DEFAULT_STD


RANDOM_WEIGHTS_SEED = 0


def _build_random(builder: Callable[..., nn.Module], num_classes: int = len(VOC_CLASSES)) -> nn.Module:
    # The same random weights on every start: their fingerprint, and so the cached exported graph, stays valid
    # (a fresh draw each start would export again and leave another graph in the cache every time).
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(RANDOM_WEIGHTS_SEED)
        # weights_backbone=None too: otherwise torchvision would try to download ImageNet backbone weights.
        return builder(weights=None, weights_backbone=None, num_classes=num_classes, aux_loss=False)


HEAD_WEIGHT = "classifier.4.weight"
"""The last convolution of DeepLabHead: one output channel per class."""


def _read_state(path: Path) -> object:
    """A state_dict from a file, never by running code: torch.load with weights_only (a pickle that would
    call anything but tensor rebuilders is refused), or safetensors, which holds tensors only."""
    if path.suffix == ".safetensors":
        try:
            from safetensors.torch import load_file  # type: ignore[import-not-found,unused-ignore]
        except ImportError:
            raise ModelLoadError(f"weights file {path} is safetensors, and safetensors is not installed") from None
        try:
            return load_file(path, device="cpu")
        except Exception as exc:
            raise ModelLoadError(f"weights file {path} is not a safetensors file: {exc}") from exc
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelLoadError(f"weights file {path} is not a torch state_dict: {first}") from exc


def _load_state_dict_file(builder: Callable[..., nn.Module], path: Path, num_classes: int) -> nn.Module:
    if not path.is_file():
        raise ModelLoadError(f"weights file {path} does not exist")
    state = _read_state(path)
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise ModelLoadError(f"weights file {path} holds a {type(state).__name__}, not a state_dict")
    head = state.get(HEAD_WEIGHT)
    if isinstance(head, torch.Tensor) and head.shape[0] != num_classes:
        raise ModelLoadError(
            f"weights file {path} does not match the labels: its head has {head.shape[0]} classes, "
            f"the labels name {num_classes}"
        )
    has_aux = any(str(key).startswith("aux_classifier.") for key in state)
    model = builder(weights=None, weights_backbone=None, num_classes=num_classes, aux_loss=has_aux)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        first_line = str(exc).strip().splitlines()[0]
        raise ModelLoadError(f"weights file {path} does not match this model: {first_line}") from exc
    return model


@dataclass
class LoadedModel:
    module: nn.Module
    weights_description: str
    trained: bool
    mean: tuple[float, ...]
    std: tuple[float, ...]


def load_model(model_name: str, weights: str, num_classes: int = len(VOC_CLASSES)) -> LoadedModel:
    """Build the model with the chosen weights and `num_classes` output classes (the pretrained weights have
    VOC's 21). Raises ModelLoadError with a one-line reason."""
    if model_name not in _BUILDERS:
        raise ModelLoadError(f"unknown model {model_name!r}: choose one of {', '.join(_BUILDERS)}")
    builder, weights_enum = _BUILDERS[model_name]
    mean, std = _normalisation(weights_enum)
    if weights in ("auto", "pretrained") and num_classes != len(VOC_CLASSES):
        raise ModelLoadError(
            f"pretrained weights have {len(VOC_CLASSES)} classes, but the labels name {num_classes}; "
            "give a state_dict file"
        )
    if weights in ("auto", "pretrained"):
        try:
            module = builder(weights=weights_enum)
            return LoadedModel(module, f"pretrained:{weights_enum.name}", True, mean, std)
        except Exception as exc:
            cache = Path(torch.hub.get_dir()) / "checkpoints" / Path(weights_enum.url).name
            how = (
                f"put {Path(weights_enum.url).name} in {cache.parent} (or set TORCH_HOME), "
                "or pass a state_dict file with SEGSERVE_WEIGHTS=/path/to/weights.pth"
            )
            reason = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}".strip()
            if weights == "pretrained":
                raise ModelLoadError(f"pretrained weights for {model_name} unavailable ({reason}); {how}") from exc
            log.warning(
                "pretrained weights for %s unavailable (%s); serving RANDOM weights, masks are meaningless. To fix: %s",
                model_name,
                reason,
                how,
            )
            return LoadedModel(
                _build_random(builder), f"random (fallback: pretrained unavailable; {how})", False, mean, std
            )
    if weights == "random":
        return LoadedModel(_build_random(builder, num_classes), "random", False, mean, std)
    path = Path(os.path.expanduser(weights))
    return LoadedModel(_load_state_dict_file(builder, path, num_classes), f"file:{path}", True, mean, std)


def without_aux_head(module: nn.Module) -> nn.Module:
    """The auxiliary head only helps training; dropping it saves a third of the compute."""
    if getattr(module, "aux_classifier", None) is not None:
        module.aux_classifier = None  # type: ignore[assignment]
    return module


def weights_fingerprint(module: nn.Module) -> str:
    """A hash of every tensor in the state_dict (names, dtypes, shapes, values): equal iff the weights are."""
    digest = hashlib.sha256()
    for name, tensor in module.state_dict().items():
        value = tensor.detach().to("cpu").contiguous().reshape(-1)
        digest.update(f"{name}|{value.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(value.view(torch.uint8).numpy().tobytes() if value.numel() else b"")
    return digest.hexdigest()
