"""Targets and tables from a benchmark JSON; renders the generated part of docs/performance.md.

`python -m bench.report [RESULT.json]` (default: the newest non-smoke result) rewrites what lies between
the BEGIN and END markers in docs/performance.md and leaves the hand-written rest alone.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

from bench import json_health, tracing_cost

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "performance.md"
BEGIN = "<!-- BEGIN bench.report: generated from the JSON, do not edit by hand -->"
END = "<!-- END bench.report -->"


def _step(steps: list[dict[str, Any]], concurrency: int) -> dict[str, Any] | None:
    return next((s for s in steps if s["concurrency"] == concurrency), None)


def _p50(by_kind: dict[str, Any], kind: str) -> float | None:
    entry = by_kind.get(kind)
    return None if entry is None else float(entry["p50_ms"])


def runtime_limits(result: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per runtime variant measured in-process: its best throughput and batch size, its single-image p50.
    Older results (before runtimes were compared) give one row, from the in-process limit."""
    variants = result.get("runtimes") or [
        {"runtime": "torch", "precision": "fp32", "default": True, "rows": result["inprocess"]}
    ]
    table = []
    for variant in variants:
        best = max(variant["rows"], key=lambda r: r["throughput"])
        single = next((r for r in variant["rows"] if r["batch_size"] == 1), None)
        table.append(
            {
                "runtime": variant["runtime"],
                "precision": variant["precision"],
                "default": variant["default"],
                "description": best.get("runtime", variant["runtime"]),
                "throughput": best["throughput"],
                "best_batch": best["batch_size"],
                "photo_p50_ms": _p50(single["by_kind"], "photo") if single else None,
            }
        )
    return table


def _fastest_fp32(result: dict[str, Any]) -> dict[str, Any]:
    """The fastest in-process variant of the served precision (int8 is reported, never served by default)."""
    table = runtime_limits(result)
    default = next(r for r in table if r["default"])
    return max((r for r in table if r["precision"] == default["precision"]), key=lambda r: r["throughput"])


def targets(result: dict[str, Any]) -> list[dict[str, Any]]:
    """Each target: what, the measured ratio, the bound, and whether it holds (None: not measured in this run)."""
    served, off = result["served"]["steps"], result["batching_off"]["steps"]
    fastest = _fastest_fp32(result)
    limit = fastest["throughput"]
    single = next((r for r in result["inprocess"] if r["batch_size"] == 1), None)
    rows: list[dict[str, Any]] = []

    at8 = _step(served, 8)
    torch_steps = result.get("served_torch", {}).get("steps", [])
    torch_at8 = _step(torch_steps, 8)
    rows.append(
        {
            "target": "served at concurrency 8, default runtime / SEGSERVE_RUNTIME=torch",
            "ratio": at8["throughput"] / torch_at8["throughput"] if at8 and torch_at8 else None,
            "bound": ">= 1.4",
        }
    )
    ratio = at8["throughput"] / limit if at8 and limit else None
    alone = max((r["throughput"] for r in result.get("model_alone", [])), default=None)
    rows.append(
        {
            "target": "served at concurrency 8 / the served runtime's model alone (best batch, same images)",
            "ratio": at8["throughput"] / alone if at8 and alone else None,
            "bound": ">= 0.9",
        }
    )
    ort_at8 = _step(result.get("served_onnxruntime_fp32", {}).get("steps", []), 8)
    rows.append(
        {
            "target": "served at concurrency 8, default (auto) / SEGSERVE_RUNTIME=onnxruntime SEGSERVE_PRECISION=fp32",
            "ratio": at8["throughput"] / ort_at8["throughput"] if at8 and ort_at8 else None,
            "bound": ">= 1.6",
        }
    )
    rows.append(
        {
            "target": f"served throughput at concurrency 8 / fastest in-process limit ({fastest['runtime']})",
            "ratio": ratio,
            "bound": ">= 0.9",
        }
    )

    ratios = [
        (s["concurrency"], s["throughput"] / o["throughput"])
        for s in served
        if (o := _step(off, s["concurrency"])) and o["throughput"] > 0
    ]
    worst = min(ratios, key=lambda cr: cr[1]) if ratios else None
    rows.append(
        {
            "target": "batching on / batching off throughput, worst concurrency"
            + (f" (c={worst[0]})" if worst else ""),
            "ratio": worst[1] if worst else None,
            "bound": ">= 1.0",
            "detail": {str(c): r for c, r in ratios},
        }
    )

    at1 = _step(served, 1)
    served_photo = _p50(at1["by_kind"], "photo") if at1 else None
    inproc_photo = _p50(single["by_kind"], "photo") if single else None
    rows.append(
        {
            "target": "p50 latency of a 640x480 JPEG at concurrency 1 / in-process single image, same runtime",
            "ratio": served_photo / inproc_photo if served_photo and inproc_photo else None,
            "bound": "<= 1.15",
        }
    )
    served_large = _p50(at1["by_kind"], "large") if at1 else None
    rows.append(
        {
            "target": "p50 latency of the 12 MP JPEG / of a 640x480 JPEG, served at concurrency 1",
            "ratio": served_large / served_photo if served_large and served_photo else None,
            "bound": "<= 2.0",
        }
    )
    # Tracing on against off (issue 42) is reported in its own section, not held to a bound: the issue asks what
    # it costs, and the two sweeps come from two servers a minute apart, whose drift on a shared machine is of
    # the same order as what is being measured.
    precisions = result.get("precisions")
    if precisions:
        worst = min(precisions["int8_over_bf16"].values())
        amx = precisions["amx_int8"]
        rows.append(
            {
                "target": "openvino int8 / bf16, the model alone, worst of batch 1 and 8"
                + ("" if amx else " (this CPU has no AMX int8: reported, not a target)"),
                "ratio": worst,
                "bound": ">= 1.5",
                "applies": amx,
            }
        )
    for row in rows:
        ratio, bound = row["ratio"], row["bound"]
        limit_value = float(bound.split()[1])
        row["met"] = (
            None
            if ratio is None or not row.get("applies", True)
            else (ratio >= limit_value if bound.startswith(">=") else ratio <= limit_value)
        )
    return rows


def _fmt(value: float | None, digits: int = 1) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def render(result: dict[str, Any], json_path: Path, png_path: Path) -> str:
    machine, run = result["machine"], result["run"]
    rel = os.path.relpath(png_path, DOC.parent)
    load = ", ".join(f"{x:.2f}" for x in machine["load_average_at_start"])
    flags = ", ".join(machine.get("cpu_flags", [])) or "none of avx2, avx512, bf16, vnni, amx"
    bf16 = {True: "native bf16", False: "no native bf16", None: "bf16 not checked"}[machine.get("native_bf16")]
    lines = [
        BEGIN,
        "",
        f"Run of {result['date']} ({json_path.name}): **{machine['device']}**, {machine['cpu']}, "
        f"{machine['cores']} cores (flags: {flags}; {bf16}), torch {machine['torch']} "
        f"({machine['torch_threads']} threads), "
        f"Python {machine['python']}; load average at start {load}. "
        f"Each step: {run['warmup_s']:g} s warm-up, then {run['windows']} windows of {run['window_s']:g} s "
        f"(throughput is the median window). Whole run: {run['wall_s'] / 60:.1f} min.",
        "",
        f"![throughput and p99 latency against concurrency]({rel})",
        "",
        "### Targets",
        "",
        "| Target | Measured | Bound | Met |",
        "| --- | --- | --- | --- |",
    ]
    for row in targets(result):
        met = {True: "yes", False: "**no**", None: "not measured" if row.get("applies", True) else "n/a"}[row["met"]]
        lines.append(f"| {row['target']} | {_fmt(row['ratio'], 2)} | {row['bound']} | {met} |")
    lines += [
        "",
        "### Served, by concurrency",
        "",
        "| Server | Concurrency | Images/s | p50 ms | p95 ms | p99 ms | Errors | Mean batch | "
        "Server parts ms (pre / queue / model / post) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    configs = (
        ("served", "batching on"),
        ("batching_off", "batching off"),
        ("served_torch", "torch"),
        ("served_fp32", "SEGSERVE_PRECISION=fp32"),
        ("served_onnxruntime_fp32", "onnxruntime fp32 named"),
    )
    for config, label in configs:
        for s in result.get(config, {}).get("steps", []):
            parts = " / ".join(f"{v:.0f}" for v in s["server_parts_ms"].values())
            lines.append(
                f"| {label} | {s['concurrency']} | {s['throughput']:.2f} | {s['p50_ms']:.0f} | {s['p95_ms']:.0f} | "
                f"{s['p99_ms']:.0f} | {s['errors']} | {s['mean_batch_size']:.2f} | {parts} |"
            )
    starts = [(label, result[config]["ready_s"]) for config, label in configs if "ready_s" in result.get(config, {})]
    if starts:
        lines += [
            "",
            "Start to SERVING, in run order (the first start on a machine measures auto's candidates unless an "
            "earlier start cached the verdict; onnxruntime fp32 named measures nothing): "
            + ", ".join(f"{label} {seconds:.1f} s" for label, seconds in starts)
            + ".",
        ]
    oip_steps = result["served"].get("oip_steps") or []
    if oip_steps:
        lines += [
            "",
            "### Open Inference Protocol, Triton's perf_analyzer (same server and images as batching on)",
            "",
            "| Protocol | Concurrency | Images/s | p50 ms | p99 ms | Server queue / compute ms "
            "| Segmenter, loadgen: images/s at this concurrency | perf_analyzer / loadgen |",
            "| --- | --- | --- | --- | --- | --- | --- | --- |",
        ]
        for s in oip_steps:
            loadgen = _step(result["served"]["steps"], s["concurrency"])
            ratio = s["throughput"] / loadgen["throughput"] if loadgen and loadgen["throughput"] else None
            lines.append(
                f"| {s['protocol']} | {s['concurrency']}{' (windows >15% apart)' if s.get('unstable') else ''} | "
                f"{s['throughput']:.2f} | {s['p50_ms']:.0f} | "
                f"{s['p99_ms']:.0f} | {s['server_queue_ms']:.0f} / {s['server_compute_ms']:.0f} | "
                f"{_fmt(loadgen['throughput'] if loadgen else None, 2)} | {_fmt(ratio, 2)} |"
            )
    lines += tracing_cost.report_lines(result)
    lines += json_health.report_lines(result["served"].get("json_health"))
    lines += [
        "",
        "### In-process (decode, model, postprocess called directly; no gRPC, no batcher)",
        "",
        "| Batch size | Images/s | p50 ms, 640x480 | p50 ms, 12 MP |",
        "| --- | --- | --- | --- |",
    ]
    for r in result["inprocess"]:
        lines.append(
            f"| {r['batch_size']} | {r['throughput']:.2f} | {_fmt(_p50(r['by_kind'], 'photo'), 0)} | "
            f"{_fmt(_p50(r['by_kind'], 'large'), 0)} |"
        )
    if result.get("model_alone"):
        lines += [
            "",
            "Model alone (the served runtime's predict on the same images, decoded beforehand): "
            + ", ".join(f"batch {r['batch_size']}: {r['throughput']:.2f} images/s" for r in result["model_alone"])
            + ".",
        ]
    lines += thread_account_lines(result)
    lines += [
        "",
        f"Served runtime, as ModelInfo.runtime reports it: `{result['served'].get('runtime', 'n/a')}`.",
        "",
        "### Runtimes, in-process (same run; served runtime marked)",
        "",
        "| Runtime | Precision | Images/s (best batch) | Best batch | p50 ms, 640x480 alone "
        "| Pixel agreement with torch | auto's check (28 images, each judged) |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    agreement = {(a["runtime"], a["precision"]): a for a in result.get("agreement", []) if a.get("device") == "cpu"}
    for r in runtime_limits(result):
        agreed = agreement.get((r["runtime"], r["precision"]))
        agreed_text = f"{agreed['agreement_with_torch_fp32']:.2%}" if agreed else "n/a"
        name = f"**{r['description']}** (served)" if r["default"] else r["description"]
        lines.append(
            f"| {name} | {r['precision']} | {r['throughput']:.2f} | {r['best_batch']} | "
            f"{_fmt(r['photo_p50_ms'], 0)} | {agreed_text} | {_check_text(agreed)} |"
        )
    gpu = [a for a in result.get("agreement", []) if a.get("device") != "cpu"]
    if gpu:
        lines += [
            "",
            "GPU variants, pixel agreement with torch fp32 on the CPU: "
            + ", ".join(f"{a['description']}: {a['agreement_with_torch_fp32']:.2%}" for a in gpu)
            + ".",
        ]
    if "agreement" in result:
        lines += [
            "",
            "Agreement is measured on the known-answer test model (tests/helpers/known_model.py) over rendered scenes: "
            "the speed runs use random weights, whose masks are one class everywhere. auto's check is the one a "
            "start runs before a lower precision may serve (server/runtimes/selection.py), on the same model "
            "against openvino fp32: pooled agreement, the image agreed on least, and its verdict.",
        ]
    lines += precision_lines(result.get("precisions"))
    served_sizes = result["served"]["batch_sizes"]
    lines += [
        "",
        f"Batches served during the batching-on sweep (ModelInfo.batch_sizes, index = size - 1): `{served_sizes}`.",
        "",
        END,
    ]
    return "\n".join(lines)


def _check_text(agreed: dict[str, Any] | None) -> str:
    check = (agreed or {}).get("check")
    if not check:
        return "n/a"
    verdict = "passes" if check["problem"] is None else f"refused: {check['problem']}"
    return f"{check['agreement']:.2%}, least {check['least']}; {verdict}"


def precision_lines(precisions: dict[str, Any] | None) -> list[str]:
    """openvino int8 against bf16 and fp32, the model alone (bench.precisions)."""
    if not precisions:
        return []
    lines = [
        "",
        f"### openvino int8, bf16 and fp32, the model alone (random weights, {precisions['max_size']} px, "
        f"interleaved, best of {precisions['rounds']} rounds)",
        "",
        *_header(["Batch", "fp32 images/s", "bf16 images/s", "int8 images/s", "int8 / bf16", "int8 / fp32"]),
    ]
    for batch, row in precisions["images_per_s"].items():
        lines.append(
            _row(
                [
                    batch,
                    *(f"{row[p]:.2f}" for p in ("fp32", "bf16", "int8")),
                    f"{precisions['int8_over_bf16'][batch]:.2f}",
                    f"{precisions['int8_over_fp32'][batch]:.2f}",
                ]
            )
        )
    starts = precisions["start_s"]
    units = "AMX int8" if precisions["amx_int8"] else ("VNNI" if precisions["native_int8"] else "no int8 units")
    lines += [
        "",
        f"This CPU: {units}; int8 {'pays' if precisions['int8_pays'] else 'does not pay'} here "
        f"(faster than bf16 at every batch size: {'yes' if precisions['int8_pays'] else 'no'}). "
        f"First start of each, one fresh cache: fp32 {starts['fp32']:.1f} s (the graph's export), "
        f"bf16 {starts['bf16']:.1f} s (compiling), int8 {starts['int8']:.1f} s (NNCF's quantization and compiling; "
        "cached for later starts). int8 as served: `" + precisions["descriptions"]["int8"] + "`.",
    ]
    return lines


def _row(cells: list[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def _header(names: list[str]) -> list[str]:
    return [_row(names), _row(["---"] * len(names))]


def _one_group_row(label: str, groups: list[str], group: str, core_ms: float) -> str:
    """A row of the thread table measured for one group only: its figure there and as the total, n/a elsewhere."""
    return _row([label, *(f"{core_ms:.1f}" if g == group else "n/a" for g in groups), f"{core_ms:.1f}"])


def thread_account_lines(result: dict[str, Any]) -> list[str]:
    """CPU per image served at the account's concurrency, by thread group, beside the model alone's."""
    account = result["served"].get("thread_account") or {}
    if not account:
        return []
    per_image = account["core_ms_per_image"]
    best_alone = max(result.get("model_alone", []), key=lambda r: r["throughput"], default=None)
    alone = best_alone.get("core_ms_per_image") if best_alone else None
    groups = list(per_image)
    lines = [
        "",
        f"### CPU per image served at concurrency {account['concurrency']}, by thread (core-ms; batching on, "
        f"{account['images']} images)",
        "",
        *_header(["Where", *groups, "total"]),
        _row(["served", *(f"{per_image[g]:.1f}" for g in groups), f"{sum(per_image.values()):.1f}"]),
    ]
    if alone is not None and best_alone is not None:
        label = f"model alone, batch {best_alone['batch_size']} (every thread)"
        lines.append(_one_group_row(label, groups, "inference", alone))
    stages = result.get("stages") or {}
    if stages and "decode/encode" in groups:
        label = "work around the model, alone (one thread, per stage)"
        lines.append(_one_group_row(label, groups, "decode/encode", stages["mix_total"]))
    cores = result["machine"]["cores"]
    at = _step(result["served"]["steps"], account["concurrency"])
    if at and at["throughput"]:
        lines += [
            "",
            f"At {at['throughput']:.2f} images/s the {cores} cores offer {cores * 1000 / at['throughput']:.1f} core-ms "
            "per image; what the table does not account for, they spent idle or on other processes.",
        ]
    return lines + stage_lines(stages, cores, best_alone)


def stage_lines(stages: dict[str, Any], cores: int, best_alone: dict[str, Any] | None) -> list[str]:
    """The work around the model per stage, and the ratio it allows: with every core busy, an image served costs at
    least the model alone's core-ms plus these, whatever the threads and their order."""
    if not stages:
        return []
    kinds = list(stages["by_kind"])
    names = list(stages["mix"])
    lines = [
        "",
        f"### The work around the model, per stage (core-ms on one thread, median of each image's calls; "
        f"{stages['images']} images)",
        "",
        *_header(["Stage", *kinds, "the bench's mix, per image"]),
    ]
    lines += [
        _row([name, *(f"{stages['by_kind'][k][name]:.2f}" for k in kinds), f"{stages['mix'][name]:.2f}"])
        for name in names
    ]
    lines.append(
        _row(["total", *(f"{sum(stages['by_kind'][k].values()):.2f}" for k in kinds), f"{stages['mix_total']:.2f}"])
    )
    alone = best_alone.get("core_ms_per_image") if best_alone else None
    if alone and best_alone and best_alone["throughput"]:
        ceiling = cores * 1000 / (alone + stages["mix_total"]) / best_alone["throughput"]
        lines += [
            "",
            f"With no core idle and the model no slower than alone, served / model alone can reach at most "
            f"{cores} x 1000 / ({alone:.1f} + {stages['mix_total']:.1f}) / {best_alone['throughput']:.2f} = "
            f"**{ceiling:.2f}** at these costs.",
        ]
    return lines


def update_performance_doc(json_path: Path, doc: Path = DOC) -> None:
    result = json.loads(json_path.read_text())
    section = render(result, json_path, json_path.with_suffix(".png"))
    text = doc.read_text() if doc.exists() else f"# Performance\n\n{BEGIN}\n{END}\n"
    head, _, rest = text.partition(BEGIN)
    _, _, tail = rest.partition(END)
    doc.write_text(head + section + tail)


def newest_result() -> Path:
    candidates = sorted(p for p in (ROOT / "bench" / "results").glob("*.json") if not p.stem.endswith("-smoke"))
    if not candidates:
        raise SystemExit("no benchmark results yet: run `make bench`")
    return max(candidates, key=lambda p: p.stat().st_mtime)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    path = Path(argv[0]) if argv else newest_result()
    update_performance_doc(path)
    for row in targets(json.loads(path.read_text())):
        sys.stdout.write(f"{row['target']}: {_fmt(row['ratio'], 2)} ({row['bound']}) met={row['met']}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
