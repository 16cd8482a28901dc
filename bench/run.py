"""`make bench` / `python -m bench.run`: the whole benchmark in one run, then the JSON, the plot and the report.

1. The in-process limit (bench.inprocess, its own process): decode, model, postprocess called directly, and
   the model alone on the same images decoded beforehand, with the server's default settings (auto), before
   and after the served sweeps; then every other runtime and precision installed (torch, onnxruntime,
   openvino fp32 and bf16, onnxruntime and openvino int8), fewer windows each.
2. A real `python -m server` (random weights, free port) with the default settings, swept by bench.loadgen
   (its own process) over the concurrency steps; then, on the same server, Triton's perf_analyzer over the
   Open Inference Protocol's gRPC and HTTP doors at concurrency 1 and 8, with its defaults (bench.perf_analyzer).
3. The same server with batching off (SEGSERVE_MAX_BATCH_SIZE=1), same sweep.
4. At concurrency 8 only: SEGSERVE_RUNTIME=torch; SEGSERVE_PRECISION=fp32 (auto's runtime, fp32); and
   onnxruntime fp32 named (the server before auto measured), for the targets' ratios.
5. Pixel agreement of each runtime with torch (bench.agreement, on the known-answer test model), and auto's
   agreement check's verdict on each.
6. openvino int8 against bf16 and fp32, the model alone, interleaved (bench.precisions), with int8's
   quantization time at a first start.
7. Tracing (bench.tracing_cost): right after step 2, the default settings with tracing on, every span exported to
   an OTLP receiver in this process, at concurrency 1 and 8; and what tracing off adds to a call, timed alone.
8. gRPC health while four 8 MB JSON ModelInfer bodies are parsed (bench.json_health), on step 2's server after
   its sweeps.

Durations come from flags or BENCH_* environment variables; BENCH_SMOKE=1 (or --smoke) is a run of
well under a minute that checks the machinery, not the numbers.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import os
import platform
import re
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench import json_health, perf_analyzer, thread_account, tracing_cost
from bench.images import image_set
from bench.plot import plot
from bench.report import update_performance_doc
from client import SegmentClient, SegmentError

log = logging.getLogger("bench")

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
SMOKE = {"concurrency": "1,8", "batch_sizes": "1,2", "warmup": 0.5, "duration": 1.5, "repeats": 1}
RUNTIME_TARGET_CONCURRENCY = 8
# perf_analyzer's steps: the single caller and the runtime target's concurrency, beside loadgen's same steps.
OIP_CONCURRENCY = (1, 8)
# The step whose CPU is accounted for by thread (issue 30's target: served / model alone at concurrency 8).
ACCOUNT_CONCURRENCY = 8
# The other runtimes' in-process rows: the batch sizes that matter on a CPU, and fewer windows, so that
# `make bench` stays under 15 minutes on 2 cores.
OTHER_RUNTIME_BATCH_SIZES = "1,4"
OTHER_RUNTIME_REPEATS = 2


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def machine_info() -> dict[str, Any]:
    import torch

    from server.runtimes import cpu_features

    cuda = torch.cuda.is_available()
    return {
        "device": torch.cuda.get_device_name(0) if cuda else "cpu",
        "cpu": cpu_features.cpu_model(),
        "cpu_flags": cpu_features.relevant_flags(),
        "native_bf16": cpu_features.native_bf16(),
        "cores": os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "load_average_at_start": os.getloadavg(),
    }


def device_slug(machine: dict[str, Any]) -> str:
    name = machine["device"] if machine["device"] != "cpu" else f"cpu-{machine['cores']}core-{machine['cpu']}"
    return re.sub(r"[^a-z0-9]+", "-", name.lower().replace("(r)", "").replace("(tm)", "")).strip("-")[:60]


def _json_lines(command: list[str], env: dict[str, str], timeout: float) -> list[dict[str, Any]]:
    log.info("running %s", " ".join(command[1:]))
    done = subprocess.run(command, env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]


def served_sweep(
    name: str,
    images: Path,
    args: argparse.Namespace,
    env: dict[str, str],
    concurrency: str | None = None,
    oip: bool = False,
    extra_env: dict[str, str] | None = None,
    json_bodies: bool = False,
) -> dict[str, Any]:
    """Starts a server, waits for SERVING, runs the load generator against it (then perf_analyzer over the
    Open Inference Protocol when `oip`, and gRPC health during big JSON bodies when `json_bodies`), stops it.
    `extra_env`: the server's variables beyond SERVER_OVERRIDES (those known only at run time, as a port)."""
    port, http_port = free_port(), free_port()
    server_env = {
        **env,
        "SEGSERVE_WEIGHTS": "random",
        "SEGSERVE_HOST": "127.0.0.1",
        "SEGSERVE_PORT": str(port),
        "SEGSERVE_HTTP_PORT": str(http_port),
    }
    settings = {**_server_overrides(name), **(extra_env or {})}
    server_env.update(settings)
    log.info("starting server (%s) on port %d", name, port)
    started = time.monotonic()
    server_log = (images.parent / f"server-{name}.log").open("wb")
    server = subprocess.Popen(
        [sys.executable, "-m", "server", "--log-level", "WARNING"], cwd=ROOT, env=server_env, stderr=server_log
    )
    try:
        with SegmentClient(f"127.0.0.1:{port}") as client:
            _wait_until_serving(client, server, Path(server_log.name))
            ready_s = time.monotonic() - started
            steps: list[dict[str, Any]] = []
            account: dict[str, Any] = {}
            for part in _split_at(concurrency or args.concurrency, ACCOUNT_CONCURRENCY if oip else None):
                if part == str(ACCOUNT_CONCURRENCY) and oip:
                    before, images_before = thread_account.snapshot(server.pid), _images_served(client)
                    steps += _loadgen(port, images, part, args, env)
                    spent = thread_account.cpu_by_group(before, thread_account.snapshot(server.pid), server.pid)
                    served_images = _images_served(client) - images_before
                    account = {
                        "concurrency": ACCOUNT_CONCURRENCY,
                        "images": served_images,
                        "core_ms_per_image": {k: v * 1000 / max(1, served_images) for k, v in spent.items()},
                    }
                else:
                    steps += _loadgen(port, images, part, args, env)
            info = client.model_info()  # before perf_analyzer: batch_sizes are the loadgen sweep's
            oip_steps = oip_sweep(info.model, {"grpc": port, "http": http_port}, images, args) if oip else []
            health_during_json = _json_health(info.model, port, http_port, env) if json_bodies else {}
        return {
            "name": name,
            "settings": settings,
            "ready_s": ready_s,
            "steps": steps,
            "oip_steps": oip_steps,
            "thread_account": account,
            "batch_sizes": list(info.batch_sizes),
            "runtime": info.runtime,
            "json_health": health_during_json,
        }
    finally:
        stop_server(server)
        server_log.close()


def _json_health(model: str, port: int, http_port: int, env: dict[str, str]) -> dict[str, Any]:
    log.info("gRPC health during %d JSON bodies of about 8 MB", json_health.BODIES)
    command = [
        sys.executable, "-m", "bench.json_health", "--grpc", f"127.0.0.1:{port}",
        "--http", f"127.0.0.1:{http_port}", "--model", model,
    ]  # fmt: skip
    return _json_lines(command, env, timeout=600)[0]


def traced_sweep(images: Path, args: argparse.Namespace, env: dict[str, str]) -> dict[str, Any]:
    """The default settings with tracing on, every span exported to an OTLP receiver in this process, at
    concurrency 1 and 8; with the spans received and the calls they trace (one SERVER span a call), which say
    the export ran. The receiver is the tests' (tests/tracing/receiver.py): a real OTLP/gRPC TraceService."""
    from tests.tracing.receiver import OtlpReceiver

    with OtlpReceiver() as receiver:
        sweep = served_sweep(
            "tracing",
            images,
            args,
            env,
            tracing_cost.TRACED_CONCURRENCY,
            extra_env=tracing_cost.server_env(receiver.endpoint),
        )
        time.sleep(1)  # the server flushed its spans at its stop; the receiver's last export lands
        spans = receiver.spans
    return sweep | {"spans": len(spans), "traced_calls": sum(s.kind == "SERVER" for s in spans)}


def _loadgen(port: int, images: Path, concurrency: str, args: argparse.Namespace, env: dict[str, str]) -> list[Any]:
    return _json_lines(
        [
            sys.executable, "-m", "bench.loadgen", "--target", f"127.0.0.1:{port}", "--images", str(images),
            "--concurrency", concurrency, "--warmup", str(args.warmup),
            "--duration", str(args.duration), "--repeats", str(args.repeats),
        ],
        env,
        timeout=3600,
    )  # fmt: skip


def _split_at(concurrency: str, alone: int | None) -> list[str]:
    """The sweep's steps as loadgen runs: all in one run, or with step `alone` in a run of its own (so that the
    per-thread CPU account covers that step only)."""
    steps = concurrency.split(",")
    if alone is None or str(alone) not in steps:
        return [concurrency]
    at = steps.index(str(alone))
    return [",".join(part) for part in (steps[:at], [str(alone)], steps[at + 1 :]) if part]


def _images_served(client: SegmentClient) -> int:
    return sum(size * count for size, count in enumerate(client.model_info().batch_sizes, start=1))


def oip_sweep(model: str, ports: dict[str, int], images: Path, args: argparse.Namespace) -> list[dict[str, Any]]:
    """perf_analyzer on the bench's images, windows as long as loadgen's, over gRPC and HTTP the same way: its
    defaults, no request parameters (it names the outputs the model lists, what a Segment call answers)."""
    data = perf_analyzer.write_input_data([p.read_bytes() for p in sorted(images.iterdir())], images.parent / "pa.json")
    steps: list[dict[str, Any]] = []
    for protocol, port in ports.items():
        log.info("perf_analyzer over %s at concurrency %s", protocol, OIP_CONCURRENCY)
        for concurrency in OIP_CONCURRENCY:

            def measure(
                stability: int, trials: int, concurrency: int = concurrency, protocol: str = protocol, port: int = port
            ) -> list[dict[str, Any]]:
                return perf_analyzer.run(
                    model, f"127.0.0.1:{port}", protocol, data, (concurrency,), int(args.duration * 1000),
                    images.parent / "pa.csv", stability_percentage=stability, max_trials=trials,
                )  # fmt: skip

            try:
                steps += measure(1000 if args.smoke else 15, 3 if args.smoke else args.repeats + 3)
            except RuntimeError as exc:
                if "stable measurement" not in str(exc):
                    raise
                # One 12 MP image in eight makes windows uneven at high concurrency; rather than lose the step,
                # measure it as loadgen does (fixed windows, no agreement asked) and say so in the report.
                log.warning(
                    "perf_analyzer found no 3 windows within 15%% over %s at concurrency %d; measuring without",
                    protocol,
                    concurrency,
                )
                steps += [step | {"unstable": True} for step in measure(1000, args.repeats)]
    return steps


def stop_server(server: subprocess.Popen[bytes]) -> None:
    """SIGTERM, as a deployment stops it (drain, exit 0); killed if it has not exited in 30 s."""
    server.send_signal(signal.SIGTERM)
    try:
        server.wait(30)
    except subprocess.TimeoutExpired:
        server.kill()
        server.wait()


def _wait_until_serving(client: SegmentClient, server: subprocess.Popen[bytes], log_path: Path) -> None:
    """Like client.wait_until_serving, but gives up at once, with the server's log, if the server exits."""
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"server exited ({server.returncode}):\n{log_path.read_text()[-3000:]}")
        try:
            client.wait_until_serving(timeout=2)
            return
        except SegmentError:
            continue
    raise RuntimeError(f"server not serving after 300 s:\n{log_path.read_text()[-3000:]}")


SERVER_OVERRIDES = {
    "batching_off": {"SEGSERVE_MAX_BATCH_SIZE": "1"},
    "torch": {"SEGSERVE_RUNTIME": "torch", "SEGSERVE_PRECISION": "fp32"},
    # auto's runtime choice, precision pinned: what auto's precision adds on this machine.
    "fp32": {"SEGSERVE_PRECISION": "fp32"},
    # The server before runtimes and precisions were chosen by measurement.
    "onnxruntime_fp32": {"SEGSERVE_RUNTIME": "onnxruntime", "SEGSERVE_PRECISION": "fp32"},
}


def _server_overrides(name: str) -> dict[str, str]:
    return SERVER_OVERRIDES.get(name, {})


VARIANTS = (
    {"runtime": "torch", "precision": "fp32"},
    {"runtime": "onnxruntime", "precision": "fp32"},
    {"runtime": "openvino", "precision": "fp32"},
    {"runtime": "openvino", "precision": "bf16"},
    {"runtime": "onnxruntime", "precision": "int8"},
    {"runtime": "openvino", "precision": "int8"},
)
"""Every runtime and precision the in-process table compares (those installed); bf16 and int8 rows are
measured even where the CPU lacks native support, so the table shows what auto avoided and why."""


def runtime_variants(served: dict[str, str]) -> list[dict[str, str]]:
    """Every installed variant except the one served (`served`: what the default run reported it ran)."""
    from server.runtimes.factory import importable

    return [v for v in VARIANTS if v != served and (v["runtime"] == "torch" or importable(v["runtime"]))]


def inprocess_command(images: Path, args: argparse.Namespace, variant: dict[str, str] | None) -> list[str]:
    """`variant` None: the server's own settings (auto, unless the environment names one), with the model
    alone timed too; else one other variant, with fewer batch sizes and windows."""
    other = variant is not None
    command = [
        sys.executable, "-m", "bench.inprocess", "--images", str(images),
        "--batch-sizes", args.batch_sizes if not other or args.smoke else OTHER_RUNTIME_BATCH_SIZES,
        "--duration", str(args.duration),
        "--repeats", str(args.repeats if not other or args.smoke else OTHER_RUNTIME_REPEATS),
    ]  # fmt: skip
    if variant is None:
        return [*command, "--model-alone", "--stage-repeats", "3" if args.smoke else "15"]
    return [*command, "--runtime", variant["runtime"], "--precision", variant["precision"]]


def what_ran(rows: list[dict[str, Any]]) -> dict[str, str]:
    return {"runtime": rows[0]["runtime_name"], "precision": rows[0]["precision"]}


def merge_inprocess_runs(before: list[dict[str, Any]], after: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per batch size from both in-process runs: throughput is the median of all their windows,
    each latency the median of the runs' p50s."""
    if not after:
        return before
    merged = []
    for first, second in zip(before, after, strict=True):
        assert first["batch_size"] == second["batch_size"]
        windows = first["throughput_windows"] + second["throughput_windows"]
        by_kind = {}
        for kind in first.get("by_kind", {}).keys() & second.get("by_kind", {}).keys():
            a, b = first["by_kind"][kind], second["by_kind"][kind]
            by_kind[kind] = {"count": a["count"] + b["count"], "p50_ms": statistics.median([a["p50_ms"], b["p50_ms"]])}
        labels: dict[str, Any] = {k: first[k] for k in ("runtime", "precision") if k in first}
        merged.append(
            {
                **labels,
                "batch_size": first["batch_size"],
                "throughput": statistics.median(windows),
                "throughput_windows": windows,
                "by_kind": by_kind,
                "core_ms_per_image": statistics.mean(r.get("core_ms_per_image", 0.0) for r in (first, second)),
            }
        )
    return merged


def _is_full_path(row: dict[str, Any]) -> bool:
    """A row of the in-process limit itself (not the model alone's, nor the stages')."""
    return not row.get("model_alone") and "stages" not in row


def merge_stage_costs(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The stage costs of the in-process runs before and after the served sweeps, each figure their mean."""
    if not runs:
        return {}

    def mean_of(pick: Any) -> dict[str, float]:
        return {stage: statistics.mean(pick(run)[stage] for run in runs) for stage in pick(runs[0])}

    return {
        "by_kind": {kind: mean_of(lambda run, kind=kind: run["by_kind"][kind]) for kind in runs[0]["by_kind"]},
        "mix": mean_of(lambda run: run["mix"]),
        "mix_total": statistics.mean(run["mix_total"] for run in runs),
        "images": runs[0]["images"],
        "runs": len(runs),
    }


def run(args: argparse.Namespace) -> Path:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    machine = machine_info()
    date = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d")
    began = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="segserve-bench-") as tmp:
        images = Path(tmp) / "images"
        images.mkdir()
        for k, image in enumerate(image_set()):
            (images / f"{image.kind}-{k}-{image.name}.jpg").write_bytes(image.data)
        default_command = inprocess_command(images, args, None)
        # The in-process limit runs before and after the served sweeps, so that a machine whose speed
        # drifts over minutes (a shared VM does) does not favour one side of the ratios.
        before_all = _json_lines(default_command, env, timeout=3600)
        at8 = str(RUNTIME_TARGET_CONCURRENCY)
        default_sweep = served_sweep("batching", images, args, env, oip=True, json_bodies=True)
        # Next to the default sweep it is set against, so that a machine's drift over minutes weighs least.
        served_tracing = traced_sweep(images, args, env)
        served = [default_sweep, served_sweep("batching_off", images, args, env)]
        served_torch = served_sweep("torch", images, args, env, at8)
        served_fp32 = served_sweep("fp32", images, args, env, at8)
        served_onnxruntime_fp32 = served_sweep("onnxruntime_fp32", images, args, env, at8)
        off_path = [sys.executable, "-m", "bench.tracing_cost"] + (
            ["--number", "20000", "--repeat", "2"] if args.smoke else []
        )
        tracing_off_path = _json_lines(off_path, env, timeout=600)[0]
        after_all = [] if args.smoke else _json_lines(default_command, env, timeout=3600)
        before, after = ([r for r in rows if _is_full_path(r)] for rows in (before_all, after_all))
        alone_before, alone_after = ([r for r in rows if r.get("model_alone")] for rows in (before_all, after_all))
        stages = [r["stages"] for r in before_all + after_all if "stages" in r]
        inprocess = merge_inprocess_runs(before, after)
        default = what_ran(before)
        runtimes = [{**default, "default": True, "rows": inprocess}]
        for variant in runtime_variants(default):
            rows = _json_lines(inprocess_command(images, args, variant), env, timeout=3600)
            runtimes.append({**variant, "default": False, "rows": rows})
        agreement = _json_lines([sys.executable, "-m", "bench.agreement"], env, timeout=3600)
        precisions = _json_lines(
            [sys.executable, "-m", "bench.precisions", "--rounds", "1" if args.smoke else "5"], env, timeout=3600
        )
    result: dict[str, Any] = {
        "date": date,
        "machine": machine,
        "run": {
            "concurrency": [int(c) for c in args.concurrency.split(",")],
            "warmup_s": args.warmup,
            "window_s": args.duration,
            "windows": args.repeats,
            "smoke": args.smoke,
            "wall_s": time.monotonic() - began,
            "server_env": {k: v for k, v in os.environ.items() if k.startswith("SEGSERVE_")},
        },
        "inprocess": inprocess,
        "inprocess_runs": [before, after],
        "model_alone": merge_inprocess_runs(alone_before, alone_after),
        "stages": merge_stage_costs(stages),
        "served": served[0],
        "batching_off": served[1],
        "served_torch": served_torch,
        "served_fp32": served_fp32,
        "served_onnxruntime_fp32": served_onnxruntime_fp32,
        "served_tracing": served_tracing,
        "tracing_off_path": tracing_off_path,
        "runtimes": runtimes,
        "agreement": agreement,
        "precisions": precisions[0] if precisions else None,
    }
    result["tracing"] = tracing_cost.summary(result)
    out = (
        Path(args.out) if args.out else RESULTS / f"{date}-{device_slug(machine)}{'-smoke' if args.smoke else ''}.json"
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    plot(result, out.with_suffix(".png"))
    log.info("wrote %s and %s in %.0f s", out, out.with_suffix(".png"), result["run"]["wall_s"])
    if not args.smoke and not args.no_doc:
        update_performance_doc(out)
    return out


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s bench: %(message)s")
    env = os.environ.get
    parser = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__.splitlines()[0])
    parser.add_argument("--concurrency", default=env("BENCH_CONCURRENCY", "1,2,4,8,16"))
    parser.add_argument("--batch-sizes", default=env("BENCH_BATCH_SIZES", "1,2,4,8"), help="for the in-process limit")
    parser.add_argument("--warmup", type=float, default=float(env("BENCH_WARMUP", "3")))
    parser.add_argument("--duration", type=float, default=float(env("BENCH_DURATION", "8")), help="seconds per window")
    parser.add_argument("--repeats", type=int, default=int(env("BENCH_REPEATS", "3")), help="windows per step")
    parser.add_argument("--smoke", action="store_true", default=env("BENCH_SMOKE", "") not in ("", "0"))
    parser.add_argument("--out", default=env("BENCH_OUT"), help="JSON path (default bench/results/<date>-<device>)")
    parser.add_argument("--no-doc", action="store_true", help="leave docs/performance.md alone")
    args = parser.parse_args(argv)
    if args.smoke:
        for key, value in SMOKE.items():
            setattr(args, key, value)
    run(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
