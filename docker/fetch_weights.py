"""Download a model's pretrained weights into the torch cache at image build time, so containers start offline.

    TORCH_HOME=/opt/torch python docker/fetch_weights.py deeplabv3_mobilenet_v3_large [WEIGHTS]

WEIGHTS (the Dockerfile's build argument) is pretrained (the default), random (nothing to fetch) or the path
of a state_dict file, which is loaded into the model once so that a file that does not fit fails the build.

Builds the model with its weights once, which downloads the file into $TORCH_HOME/hub/checkpoints/,
checks its hash and proves that it loads: the same call the server makes at start-up. Kept apart from
the server package so that this (slow, large) image layer does not depend on the source code.
"""

from __future__ import annotations

import sys
from typing import Any

# The weights the server loads (server/runtimes/weights.py); a test keeps the two in step.
WEIGHTS_NAME = "COCO_WITH_VOC_LABELS_V1"


def weights_for(model_name: str) -> Any:
    from torchvision.models import get_model_weights

    return getattr(get_model_weights(model_name), WEIGHTS_NAME)


def fetch(model_name: str) -> str:
    """Download (or find in the cache) and load the weights; returns the cached file's path."""
    from pathlib import Path

    import torch
    from torchvision.models import get_model

    weights = weights_for(model_name)
    get_model(model_name, weights=weights)
    return str(Path(torch.hub.get_dir()) / "checkpoints" / Path(weights.url).name)


def check_state_dict(model_name: str, path: str) -> str:
    """Load a state_dict file into the model, strictly, as the server will (aux head or not)."""
    import torch
    from torchvision.models import get_model

    state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    has_aux = any(str(key).startswith("aux_classifier.") for key in state)
    model = get_model(model_name, weights=None, weights_backbone=None, num_classes=21, aux_loss=has_aux)
    model.load_state_dict(state, strict=True)
    return path


def main(argv: list[str]) -> int:
    if len(argv) not in (1, 2):
        sys.stderr.write("usage: python docker/fetch_weights.py MODEL_NAME [pretrained|random|PATH]\n")
        return 2
    weights = argv[1] if len(argv) == 2 else "pretrained"
    if weights == "random":
        sys.stdout.write(f"{argv[0]}: random weights, nothing to fetch\n")
        return 0
    try:
        path = fetch(argv[0]) if weights == "pretrained" else check_state_dict(argv[0], weights)
    except Exception as exc:
        sys.stderr.write(f"fetch_weights.py: cannot fetch weights for {argv[0]}: {type(exc).__name__}: {exc}\n")
        return 1
    sys.stdout.write(f"{argv[0]}: {path}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
