"""The production image for the cluster tests: the container tests' build of the project's Dockerfile.

`server` target, random weights, built through Compose with the container tests' stand-ins
(tests/containers/stand_ins.py: the debootstrapped base image, the local wheels served as one index), so
one build serves both suites and a second run finds it cached. deploy/cluster/local-cluster.sh seeds it
into every node's engine.

Tried and not kept: a smaller image with the local wheels' CPU torch (2.13.0+cpu, 1.9 GB instead of 6.6 GB):
no matching torchvision is to be had here (0.28.0 from PyPI fails on import: "operator torchvision::nms
does not exist").
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from tests.containers.compose import SERVER_IMAGE, build_images
from tests.containers.stand_ins import ensure_base_image, wheel_index


def build_image() -> str:
    base = ensure_base_image()
    with wheel_index() as index_url, tempfile.TemporaryDirectory(prefix="segserve-cluster-build-") as work:
        build_images(
            Path(work), {"BASE_IMAGE": base, "TORCH_INDEX_URL": index_url, "WEIGHTS": "random"}, ["server"], False
        )
    return SERVER_IMAGE


if __name__ == "__main__":
    print(build_image())
