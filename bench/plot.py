"""The benchmark's picture: throughput and p99 latency against concurrency (served, batching off, the limit)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt


def plot(result: dict[str, Any], path: Path) -> None:
    served, off = result["served"]["steps"], result["batching_off"]["steps"]
    limit = max(r["throughput"] for r in result["inprocess"])
    single = next((r for r in result["inprocess"] if r["batch_size"] == 1), None)
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2), constrained_layout=True)
    for steps, label, style in ((served, "served (batching on)", "o-"), (off, "served, batching off", "s--")):
        concurrency = [s["concurrency"] for s in steps]
        left.plot(concurrency, [s["throughput"] for s in steps], style, label=label)
        right.plot(concurrency, [s["p99_ms"] for s in steps], style, label=label)
    left.axhline(limit, color="grey", linestyle=":", label="in-process limit (best batch)")
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
    machine = result["machine"]
    fig.suptitle(
        f"segserve {result['date']}: {machine['device']} ({machine['cpu']}, {machine['cores']} cores)", fontsize=10
    )
    fig.savefig(path, dpi=110)
    plt.close(fig)
