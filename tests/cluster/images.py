"""The production image for the cluster tests: the project's Dockerfile, its `server` target, a CPU torch.

Built with the container tests' stand-ins (tests/containers/stand_ins.py: the debootstrapped base image and
the local wheels served as one index), random weights. Unlike the container tests' image it takes the CPU
build of torch the Dockerfile defaults to (here the local wheels' torch 2.13.0+cpu with torchvision 0.28.0):
the CUDA torch those wheels hold for 2.14.1 makes a 6.6 GB image, which took 6.5 minutes to load into one
node's engine on two busy cores; the CPU image is about a fifth of that.
"""

from __future__ import annotations

import subprocess

from tests.container_files import REPO
from tests.containers.stand_ins import ensure_base_image, wheel_index

IMAGE = "segserve-cluster-test:cpu"
TORCH = {"TORCH_VERSION": "2.13.0+cpu", "TORCHVISION_VERSION": "0.28.0"}


def build_image(tag: str = IMAGE, timeout: float = 3000) -> str:
    """`docker build --target server` of this checkout (cached by the engine: a code change rebuilds the last layers)."""
    base = ensure_base_image()
    with wheel_index() as index_url:
        args = {"BASE_IMAGE": base, "TORCH_INDEX_URL": index_url, "WEIGHTS": "random", **TORCH}
        argv = ["docker", "build", "--network", "host", "--target", "server", "--tag", tag]
        for key, value in args.items():
            argv += ["--build-arg", f"{key}={value}"]
        done = subprocess.run(
            [*argv, str(REPO)],
            capture_output=True,
            text=True,
            timeout=timeout,
            env={"DOCKER_BUILDKIT": "0", "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"},
            check=False,
        )
    if done.returncode != 0:
        raise RuntimeError(f"docker build of {tag} failed:\n{done.stdout[-3000:]}\n{done.stderr[-5000:]}")
    return tag


if __name__ == "__main__":
    print(build_image())
