"""A model repository for the multi-model tests, built from the known-answer model (tests/helpers/known_model.py).

"shapes" is the known-answer model as trained (21 VOC classes; red, green and blue shapes are person,
pottedplant and boat). "colours" is the same network with a head of its own: the classifier's rows of
background, person, pottedplant and boat, in that order, so it has 4 classes named and coloured by a labels
file. Its answers are known without training: where the known model says person, it says class 1, and so on.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch
import yaml

from tests.helpers.known_model import CLASS_OF, NUM_CLASSES

HEAD_WEIGHT, HEAD_BIAS = "classifier.4.weight", "classifier.4.bias"
# Class index in "colours" of each shape colour, and the VOC class whose classifier row it keeps.
COLOURS_CLASS_OF = {"red": 1, "green": 2, "blue": 3}
KEPT_ROWS = [0, CLASS_OF["red"], CLASS_OF["green"], CLASS_OF["blue"]]
COLOURS_LABELS = [
    {"name": "background", "color": "#000000"},
    {"name": "crimson", "color": "#ff00aa"},
    {"name": "leaf", "color": [0, 200, 0]},
    {"name": "sky"},  # its colour is generated
]
KNOWN_SIZE = 128


def derive_four_class_state(known_weights: Path) -> dict[str, torch.Tensor]:
    state = torch.load(known_weights, map_location="cpu", weights_only=True)
    assert state[HEAD_WEIGHT].shape[0] == NUM_CLASSES
    derived = dict(state)
    derived[HEAD_WEIGHT] = state[HEAD_WEIGHT][KEPT_ROWS].clone()
    derived[HEAD_BIAS] = state[HEAD_BIAS][KEPT_ROWS].clone()
    return derived


def _link_or_copy(source: Path, target: Path) -> None:
    try:
        os.link(source, target)
    except OSError:
        shutil.copyfile(source, target)


def write_config(folder: Path, **config: object) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def build_repository(root: Path, known_weights: Path, *, batch_delay_ms: float = 5.0) -> Path:
    """shapes/ (the known model), colours/ (its 4-class derivation with a labels file)."""
    shapes = root / "shapes"
    shapes.mkdir(parents=True)
    _link_or_copy(known_weights, shapes / "weights.pt")
    common = {"architecture": "deeplabv3_mobilenet_v3_large", "weights": "weights.pt", "max_size": KNOWN_SIZE}
    write_config(shapes, **common, max_batch_delay_ms=batch_delay_ms)
    colours = root / "colours"
    colours.mkdir()
    torch.save(derive_four_class_state(known_weights), colours / "weights.pt")
    (colours / "labels.yaml").write_text(yaml.safe_dump({"labels": COLOURS_LABELS}))
    write_config(colours, **common, labels="labels.yaml", max_batch_delay_ms=batch_delay_ms)
    return root
