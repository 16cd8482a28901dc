"""HTML for the page's panels: the model, the legend, the timing, status lines. Pure functions of their inputs."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from html import escape

from client import ClassShare, Timing
from protos.segserve.v1 import segserve_pb2 as pb

FALLBACK_COLOR = "#808080"


def status(message: str, kind: str = "info") -> str:
    """A status line; kind is info, ok, warning or error (error lines carry role=alert for screen readers)."""
    role = ' role="alert"' if kind == "error" else ""
    return f'<div class="segserve-status segserve-{kind}"{role}>{escape(message)}</div>'


def model_panel(info: pb.ModelInfo) -> str:
    served = sum(info.batch_sizes)
    rows = [
        *([("Name", info.name + (" (default)" if info.is_default else ""))] if info.name else []),
        ("Model", info.model),
        ("Weights", info.weights),
        ("Device", info.device),
        ("Runtime", info.runtime),
        ("Max size", f"{info.max_size} px"),
        ("Batching", f"up to {info.max_batch_size} images, {info.max_batch_delay_ms:g} ms"),
        ("Batches served", str(served)),
        ("Classes", str(len(info.labels))),
        *([("Memory", f"{info.resident_bytes / 2**20:.0f} MiB")] if info.resident_bytes else []),
    ]
    # Long values (the fallback's explanation) are cut; the full text is in the tooltip and the warning below.
    facts = "".join(
        f'<div><dt>{escape(k)}</dt><dd title="{escape(v)}">{escape(v if len(v) <= 48 else v[:45] + "…")}</dd></div>'
        for k, v in rows
    )
    html = f'<dl class="segserve-facts" id="segserve-model">{facts}</dl>'
    if not info.weights_are_trained:
        html += (
            '<div class="segserve-status segserve-warning" id="segserve-random-warning" role="alert">'
            "<strong>The server runs on random weights: the masks are meaningless.</strong> "
            f"It could not load the pretrained {escape(info.model)} weights. To fix it, put the weights file in the "
            "torch cache (<code>~/.cache/torch/hub/checkpoints/</code>) or start the server with "
            "<code>SEGSERVE_WEIGHTS=/path/to/state_dict.pth</code>, then restart it. "
            "See the README, section “Weights offline”.</div>"
        )
    return html


def unreachable_panel(message: str) -> str:
    return '<div id="segserve-model">' + status(message, "error") + "</div>"


def label_colors(info: pb.ModelInfo | None) -> dict[int, str]:
    return {label.index: label.color for label in info.labels} if info is not None else {}


def legend(classes: Iterable[ClassShare], colors: Mapping[int, str]) -> str:
    """One row per class found: colour swatch, name, share of the image (largest first). Names as the model's
    labels give them, so class 0 reads `__background__` here as in every answer of the server."""
    rows = []
    for share in sorted(classes, key=lambda c: c.fraction, reverse=True):
        color = colors.get(share.index, FALLBACK_COLOR)
        percent = share.fraction * 100
        shown = f"{percent:.1f}%" if percent >= 0.1 else "<0.1%"
        rows.append(
            f'<li class="segserve-legend-row" data-class="{escape(share.name)}" data-fraction="{share.fraction:.6f}">'
            f'<span class="segserve-swatch" style="background:{escape(color)}"></span>'
            f'<span class="segserve-name">{escape(share.name)}</span>'
            f'<span class="segserve-bar"><span style="width:{min(percent, 100):.1f}%;background:{escape(color)}">'
            f"</span></span>"
            f'<span class="segserve-share">{shown}</span></li>'
        )
    if not rows:
        return status("No classes found.")
    return f'<ul class="segserve-legend" id="segserve-legend-list">{"".join(rows)}</ul>'


def timing(t: Timing, model_size: tuple[int, int], size: tuple[int, int]) -> str:
    """Where the time went, and what the model saw."""
    chips = [
        ("queue", f"{t.queue_ms:.1f} ms"),
        ("inference", f"{t.inference_ms:.0f} ms"),
        ("batch size", str(t.batch_size)),
        ("decode + resize", f"{t.preprocess_ms:.0f} ms"),
        ("mask + overlay", f"{t.postprocess_ms:.0f} ms"),
        ("total on server", f"{t.total_ms:.0f} ms"),
        ("image", f"{size[0]}x{size[1]}"),
        ("model input", f"{model_size[0]}x{model_size[1]}"),
    ]
    body = "".join(f'<span class="segserve-chip"><b>{escape(k)}</b> {escape(v)}</span>' for k, v in chips)
    return f'<div class="segserve-timing" id="segserve-timing-chips">{body}</div>'


CSS = """
.segserve-status { padding: 10px 14px; border-radius: 8px; margin: 4px 0; line-height: 1.45;
  border: 1px solid var(--border-color-primary); background: var(--background-fill-secondary);
  color: var(--body-text-color); overflow-wrap: anywhere; }
.segserve-ok { border-color: #16a34a; }
.segserve-warning { border-color: #d97706; background: rgba(217, 119, 6, 0.12); }
.segserve-error { border-color: #dc2626; background: rgba(220, 38, 38, 0.12); font-weight: 600; }
.segserve-status code { font-size: 0.9em; }
.segserve-facts { display: flex; flex-wrap: wrap; gap: 6px 22px; margin: 0 0 6px 0; }
.segserve-facts dt { font-size: 0.78em; text-transform: uppercase; letter-spacing: 0.04em;
  color: var(--body-text-color-subdued); }
.segserve-facts dd { margin: 0; font-family: var(--font-mono); font-size: 0.92em; }
.segserve-legend { list-style: none; padding: 0; margin: 0; }
.segserve-legend-row { display: grid; grid-template-columns: 18px 8.5em 1fr 4.5em; align-items: center;
  gap: 10px; padding: 4px 0; }
.segserve-swatch { width: 18px; height: 18px; border-radius: 4px; border: 1px solid var(--border-color-primary); }
.segserve-bar { height: 8px; border-radius: 4px; background: var(--background-fill-secondary); overflow: hidden; }
.segserve-bar > span { display: block; height: 100%; }
.segserve-share { text-align: right; font-variant-numeric: tabular-nums; }
.segserve-timing { display: flex; flex-wrap: wrap; gap: 6px; }
.segserve-chip { padding: 3px 9px; border-radius: 999px; background: var(--background-fill-secondary);
  border: 1px solid var(--border-color-primary); font-size: 0.88em; font-variant-numeric: tabular-nums; }
.segserve-chip b { font-weight: 600; color: var(--body-text-color-subdued); margin-right: 3px; }
.segserve-results { list-style: none; padding: 0; margin: 0; }
.segserve-results li { padding: 3px 0; }
"""
