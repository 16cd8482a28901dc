"""What each DeepLabV3 backbone costs in resident memory as one more model in a server.

`python -m bench.model_memory [--runtime NAME] [--max-size N]` prints one JSON object per architecture.
Each runs in a fresh child process: a pipeline (the server's own, transport-free) with two models, a
mobilenet first (it pays for importing and starting the runtime library), then the architecture measured;
the figure is the second model's ModelInfo.resident_bytes, what loading, exporting and warming it added to
the process. Weights are random: same shapes and bytes as the pretrained ones, so the same memory.
Other settings come from the SEGSERVE_* environment, as the server reads them.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
from typing import Any

from server.core.memory import resident_bytes
from server.core.pipeline import SegmentationPipeline
from server.models.repository import ARCHITECTURE_WEIGHTS_BYTES, ARCHITECTURES
from server.settings import Settings

BASE = "deeplabv3_mobilenet_v3_large"


async def _measure(architecture: str, overrides: dict[str, Any]) -> dict[str, Any]:
    settings = Settings(models=f"base={BASE},probe={architecture}", weights="random", **overrides)
    pipeline = SegmentationPipeline(settings)
    await pipeline.start()
    base, probe = pipeline.models.named("base"), pipeline.models.named("probe")
    assert base is not None and probe is not None and probe.runtime is not None
    result = {
        "architecture": architecture,
        "runtime": probe.runtime.description,
        "max_size": probe.settings.max_size,
        "weights_mib": round(ARCHITECTURE_WEIGHTS_BYTES[architecture] / 2**20, 1),
        "resident_mib": round(probe.resident_bytes / 2**20, 1),
        "first_model_mib": round(base.resident_bytes / 2**20, 1),
        "process_mib": round(resident_bytes() / 2**20, 1),
    }
    await pipeline.close()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.model_memory", description=__doc__)
    parser.add_argument("--runtime", default=None, help="auto, torch, onnxruntime or openvino (default: settings)")
    parser.add_argument("--max-size", type=int, default=None, help="longest side (default: settings)")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    overrides = {k: v for k, v in (("runtime", args.runtime), ("max_size", args.max_size)) if v is not None}
    if args.child:
        print(json.dumps(asyncio.run(_measure(args.child, overrides))))
        return
    for architecture in ARCHITECTURES:
        child = [sys.executable, "-m", "bench.model_memory", "--child", architecture]
        child += [f"--{k.replace('_', '-')}={v}" for k, v in overrides.items()]
        done = subprocess.run(child, capture_output=True, text=True, check=True)
        print(done.stdout.strip().splitlines()[-1], flush=True)


if __name__ == "__main__":
    main()
