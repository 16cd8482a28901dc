"""Pixel agreement of every runtime and precision with torch fp32, on a model whose masks depend on the image.

`python -m bench.agreement` prints one JSON object per runtime variant. Random weights (what the speed runs
use) paint one class everywhere, so agreement is measured on the known-answer test model
(tests/helpers/known_model.py: trained once, cached) over rendered scenes at the size it was trained for,
and each variant goes through auto's agreement check (the 28 check images, each judged). On a CUDA
machine torch on the GPU is compared too: fp32, fp16, bf16 (bound 99%; the graph runtimes' is 99.9%) and
fp32 with CUDA graphs captured per shape (SEGSERVE_CAPTURE). These GPU rows are the only check of those
paths: CI has no GPU, and a test that skips there would be a gap nobody sees.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from typing import Any

import numpy as np
import torch

from server.runtimes.base import Runtime
from server.runtimes.calibration import check_images
from server.runtimes.factory import create_runtime, importable
from server.runtimes.selection import Candidate, Trial, can_judge, check
from server.settings import Settings

MAX_SIZE = 128
SHAPES = ((96, 128), (128, 96), (128, 128))


def variants() -> list[dict[str, str]]:
    """Every runtime and precision that can run here, torch fp32 on the CPU (the reference) first."""
    found = [{"runtime": "torch", "precision": "fp32", "device": "cpu"}]
    found += [
        {"runtime": name, "precision": precision, "device": "cpu"}
        for name, precision in (
            ("onnxruntime", "fp32"),
            ("openvino", "fp32"),
            ("openvino", "bf16"),
            ("onnxruntime", "int8"),
            ("openvino", "int8"),
        )
    ]
    found = [v for v in found if v["runtime"] == "torch" or importable(v["runtime"])]
    if torch.cuda.is_available():
        found += [{"runtime": "torch", "precision": p, "device": "cuda"} for p in ("fp32", "fp16", "bf16")]
        found.append({"runtime": "torch", "precision": "fp32", "device": "cuda", "capture": "true"})
    return found


def scenes(count: int) -> list[np.ndarray]:
    from tests.helpers.known_model import random_shapes, render_scene

    rng = np.random.default_rng(2026)
    out = []
    for k in range(count):
        height, width = SHAPES[k % len(SHAPES)]
        out.append(render_scene(width, height, random_shapes(rng), seed=k)[0])
    return out


def _labels(runtime: Runtime, images: list[np.ndarray]) -> list[np.ndarray]:
    return [runtime.predict([image])[0] for image in images]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.agreement", description=__doc__.splitlines()[0])
    parser.add_argument("--scenes", type=int, default=24)
    args = parser.parse_args(argv)
    from tests.helpers.known_model import MODEL_NAME, known_weights

    weights = str(known_weights())
    images = scenes(args.scenes)
    named = check_images(MAX_SIZE)
    check_set = [image for _, image in named]
    reference: list[np.ndarray] | None = None
    check_reference: list[np.ndarray] = []
    with tempfile.TemporaryDirectory(prefix="segserve-agreement-") as cache:
        for variant in variants():
            settings = Settings(
                model=MODEL_NAME,
                weights=weights,
                max_size=MAX_SIZE,
                cache_dir=cache,
                **variant,  # type: ignore[arg-type]
            )
            runtime = create_runtime(settings.model_settings())
            _labels(runtime, images[:3])  # captured graphs record on their first calls of each shape
            labels = _labels(runtime, images)
            checked = _labels(runtime, check_set)
            if reference is None:
                reference, check_reference = labels, checked
            agreement = float(np.mean([(a == b).mean() for a, b in zip(labels, reference, strict=True)]))
            trial = Trial(Candidate(variant["runtime"], variant["precision"]))
            judged = can_judge(check_reference)
            check(trial, checked, check_reference, [name for name, _ in named], judged=judged)
            row: dict[str, Any] = {
                **variant,
                "description": runtime.description,
                "agreement_with_torch_fp32": agreement,
                # auto's own check (server/runtimes/selection.py) of this variant against torch fp32
                "check": {
                    "agreement": trial.agreement,
                    "least": trial.least,
                    "judged": judged,
                    "problem": trial.problem,
                },
            }
            sys.stdout.write(json.dumps(row) + "\n")
            sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
