"""The benchmark's picture: throughput and p99 latency against concurrency (served, batching off, the limit),
and the in-process limit of every runtime measured."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt


def plot(result: dict[str, Any], path: Path) -> None:
    from bench.report import runtime_limits

    served, off = result["served"]["steps"], result["batching_off"]["steps"]
    limit = max(r["throughput"] for r in result["inprocess"])
    single = next((r for r in result["inprocess"] if r["batch_size"] == 1), None)
    fig, (left, right, bars) = plt.subplots(
        1, 3, figsize=(16, 4.2), constrained_layout=True, gridspec_kw={"width_ratios": [1, 1, 0.9]}
    )
    for steps, label, style in ((served, "served (batching on)", "o-"), (off, "served, batching off", "s--")):
        concurrency = [s["concurrency"] for s in steps]
        left.plot(concurrency, [s["throughput"] for s in steps], style, label=label)
        right.plot(concurrency, [s["p99_ms"] for s in steps], style, label=label)
    torch_steps = result.get("served_torch", {}).get("steps", [])
    if torch_steps:
        left.plot([s["concurrency"] for s in torch_steps], [s["throughput"] for s in torch_steps], "x", ms=9,
                  label="served, SEGSERVE_RUNTIME=torch")  # fmt: skip
    left.axhline(limit, color="grey", linestyle=":", label="in-process limit, served runtime (best batch)")
    if single is not None and "photo" in single["by_kind"]:
        right.axhline(single["by_kind"]["photo"]["p50_ms"], color="grey", linestyle=":", label="in-process, 1 image")
    for axis, title, unit in ((left, "Throughput", "images/s"), (right, "p99 latency", "ms")):
        axis.set_xscale("log", base=2)
        axis.set_xticks(result["run"]["concurrency"], [str(c) for c in result["run"]["concurrency"]])
        axis.set_xlabel("concurrent requests")
        axis.set_ylabel(unit)
        axis.set_title(title)
        axis.set_ylim(bottom=0)
        axis.grid(alpha=0.3)
        axis.legend(fontsize=8)
    table = runtime_limits(result)
    names = [f"{r['runtime']}\n{r['precision']}" + (" (served)" if r["default"] else "") for r in table]
    bars.barh(
        names, [r["throughput"] for r in table], color=["tab:blue" if r["default"] else "tab:grey" for r in table]
    )
    bars.invert_yaxis()
    bars.set_xlabel("images/s, in-process, best batch")
    bars.set_title("Runtimes")
    bars.grid(alpha=0.3, axis="x")
    machine = result["machine"]
    fig.suptitle(
        f"segserve {result['date']}: {machine['device']} ({machine['cpu']}, {machine['cores']} cores)", fontsize=10
    )
    fig.savefig(path, dpi=110)
    plt.close(fig)
