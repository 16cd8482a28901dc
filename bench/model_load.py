"""Loading models while a server serves: what a run-time load costs the model already serving, how long loads
take, and what resident memory does over load/unload cycles (docs/operations.md, Loading and unloading).

`python -m bench.model_load [--seconds 20] [--callers 2] [--cycles 10] [--runtime auto]` starts `python -m server`
with a repository of two random-weight mobilenets ("base" serving, "extra" loaded at run time, max_size 256) and
prints one JSON object:
- the latency of Segment calls on base from `--callers` closed-loop callers, without a load and during a cold
  load of extra (an empty graph cache: its export and, with auto, the building and timing of every candidate),
  p50/p99 and the calls made, with the load's time;
- the time of a warm load (graph and auto's verdict cached) and the server's RSS after each of `--cycles`
  load/unload cycles of extra, relative to the RSS after the first.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import yaml  # type: ignore[import-untyped,unused-ignore]  # no stubs installed
from PIL import Image

from client import SegmentClient, SegmentError

MOBILENET = "deeplabv3_mobilenet_v3_large"


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status", encoding="ascii") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def _image() -> bytes:
    buffer = io.BytesIO()
    Image.effect_noise((320, 240), 60).convert("RGB").save(buffer, "PNG")
    return buffer.getvalue()


def _percentile(values: list[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(share * len(ordered)))] if ordered else 0.0


def _summary(latencies: list[float], failures: int) -> dict[str, Any]:
    return {
        "calls": len(latencies),
        "failed": failures,
        "p50_ms": round(statistics.median(latencies), 1) if latencies else None,
        "p99_ms": round(_percentile(latencies, 0.99), 1),
    }


def _measure_serving(client: SegmentClient, callers: int, seconds: float, load: str | None) -> dict[str, Any]:
    image, latencies, failures = _image(), [], []
    busy = threading.Event()
    busy.set()

    def caller() -> None:
        while busy.is_set():
            started = time.perf_counter()
            try:
                client.segment(image, model="base")
            except SegmentError as exc:
                failures.append(str(exc))
                continue
            latencies.append((time.perf_counter() - started) * 1000)

    threads = [threading.Thread(target=caller) for _ in range(callers)]
    for thread in threads:
        thread.start()
    started = time.monotonic()
    result: dict[str, Any] = {}
    if load is None:
        time.sleep(seconds)  # a measurement window, not synchronisation
    else:
        client.load_model(load, timeout=1200.0)
        result["load_s"] = round(time.monotonic() - started, 1)
    busy.clear()
    for thread in threads:
        thread.join()
    return result | _summary(latencies, len(failures))


def _write_model(folder: Path, seed: int) -> None:
    """A mobilenet with random weights of its own, in a file: a second load of it finds its graph cached."""
    import torch
    from torchvision.models.segmentation import deeplabv3_mobilenet_v3_large

    torch.manual_seed(seed)
    folder.mkdir(parents=True)
    torch.save(deeplabv3_mobilenet_v3_large(weights=None, weights_backbone=None).state_dict(), folder / "weights.pt")
    (folder / "config.yaml").write_text(yaml.safe_dump({"architecture": MOBILENET, "weights": "weights.pt"}))


def run(seconds: float, callers: int, cycles: int, runtime: str) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="segserve-load-bench-") as scratch:
        root = Path(scratch)
        _write_model(root / "models" / "base", seed=1)
        port = _free_port()
        env = dict(
            os.environ,
            SEGSERVE_HOST="127.0.0.1",
            SEGSERVE_PORT=str(port),
            SEGSERVE_MODEL_REPOSITORY=str(root / "models"),
            SEGSERVE_MODEL_CONTROL="true",
            SEGSERVE_DEFAULT_MODEL="base",
            SEGSERVE_RUNTIME=runtime,
            SEGSERVE_MAX_SIZE="256",
            SEGSERVE_CACHE_DIR=str(root / "cache"),
            SEGSERVE_METRICS_PORT="-1",
            SEGSERVE_HTTP_PORT="-1",
            SEGSERVE_LOG_LEVEL="WARNING",
        )
        with open(root / "server.log", "w") as log:
            server = subprocess.Popen([sys.executable, "-m", "server"], env=env, stdout=log, stderr=log)
        try:
            with SegmentClient(f"127.0.0.1:{port}", timeout=600) as client:
                client.wait_until_serving(900)
                _write_model(root / "models" / "extra", seed=2)  # added at run time: its first load is cold
                without = _measure_serving(client, callers, seconds, None)
                during = _measure_serving(client, callers, seconds, "extra")
                client.unload_model("extra")
                rss = []
                load_s = []
                first = 0.0
                for cycle in range(cycles + 1):
                    started = time.monotonic()
                    client.load_model("extra", timeout=1200.0)
                    load_s.append(round(time.monotonic() - started, 2))
                    client.segment(_image(), model="extra")
                    client.unload_model("extra")
                    if cycle == 0:  # the first after the cold load
                        first = _rss_mib(server.pid)
                    else:
                        rss.append(round(_rss_mib(server.pid) - first, 1))
        finally:
            server.terminate()
            server.wait(60)
    return {
        "runtime": runtime,
        "callers": callers,
        "cpus": os.cpu_count(),
        "without_load": without,
        "during_cold_load": during,
        "p99_factor": round(during["p99_ms"] / without["p99_ms"], 2) if without["p99_ms"] else None,
        "cycle_load_s": load_s,
        "rss_after_unload_mib": rss,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=20.0, help="the window without a load")
    parser.add_argument("--callers", type=int, default=2)
    parser.add_argument("--cycles", type=int, default=10)
    parser.add_argument("--runtime", default="auto")
    args = parser.parse_args()
    print(json.dumps(run(args.seconds, args.callers, args.cycles, args.runtime)))


if __name__ == "__main__":
    main()
