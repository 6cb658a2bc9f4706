"""Rendering of `falconbench plan`."""

from __future__ import annotations

from typing import Sequence

from ..planner import SAFETY_MARGIN, PlanRow
from .console import Col, Grid, format_bytes, to_csv, to_json, to_markdown

# Narrow terminals first move a value shared by every row above the table and the warnings under it, then fold
# Attn and Smallest GPU under the first column, then Context and Batch, and drop Runtime* last (Total counts it).
COLUMNS = (Col("Model", hoist=True, ident=True), Col("Attn", priority=5, hoist=True),
           Col("Dtype", hoist=True, ident=True), Col("Context", True, 3, hoist=True, ident=True),
           Col("Batch", True, 2, hoist=True, ident=True), Col("Weights", True), Col("KV cache", True),
           Col("Runtime*", True, 1, "drop"), Col("Total", True), Col("Smallest GPU", priority=4),
           Col("Warnings", priority=6, retreat="note", style="yellow"))
HEADERS = tuple(c.header for c in COLUMNS)
RIGHT = tuple(c.right for c in COLUMNS)


def _cells(row: PlanRow) -> list[str]:
    smallest = row.fits_gpus[0] if row.fits_gpus else "none (split or quantize)"
    attention = f"{row.attention} ({row.kv_heads} KV)" if row.kv_heads else row.attention
    return [row.model, attention, row.dtype, f"{row.context:,}", str(row.batch), weights_cell(row),
            format_bytes(row.kv_cache_bytes), format_bytes(row.runtime_bytes), format_bytes(row.total_bytes),
            smallest, "; ".join(row.warnings)]


def weights_cell(row) -> str:
    """Weights, marked `~` when they are an estimate and `†` when the libraries leave a block unquantized."""
    marks = ("~" if row.exactness != "exact" else "") + ("†" if row.limited_by_libraries else "")
    return format_bytes(row.weights_bytes) + marks


def exactness_note(rows) -> str:
    """What the marks mean, naming the rows; a plain "exact" only when every row is."""
    estimates = sorted({r.model for r in rows if r.exactness != "exact"})
    limited = sorted({f"{r.model} {r.dtype}" for r in rows if r.limited_by_libraries})
    notes = []
    if estimates:
        notes.append(f"~ ESTIMATE, not exact: {', '.join(estimates)}; its warning says why and what makes it "
                     "exact.")
    if limited:
        notes.append(f"† Exact, but limited by the libraries: {', '.join(limited)} keep fused MoE experts 16-bit "
                     "(bitsandbytes quantizes only nn.Linear; see Warnings).")
    return " ".join(notes)


def plan_table(rows: Sequence[PlanRow]) -> Grid:
    show = len(COLUMNS) if any(r.warnings for r in rows) else len(COLUMNS) - 1
    return Grid(COLUMNS[:show], [_cells(r)[:show] for r in rows], title="falconbench plan", caption=_caption(rows))


def _caption(rows: Sequence[PlanRow]) -> str:
    if not rows:
        return ""
    r = rows[0]
    exact = "Weights and KV cache are exact" if all(x.exactness == "exact" for x in rows) else \
        "Weights and KV cache are exact except where marked ~"
    note = exactness_note(rows)
    kv = {row.kv_dtype for row in rows}
    cache = f"{r.kv_dtype} cache" if len(kv) == 1 else "cache in each scheme's compute dtype"
    return (f"{exact} ({cache}). {note + ' ' if note else ''}*Runtime is an estimate: CUDA context, "
            f"prefill activations and logits ({r.attn_impl} attention). Smallest GPU keeps "
            f"{SAFETY_MARGIN:.0%} of its memory free.")


def placement_line(model: str, dtype: str, placement) -> str:
    """Where a device map puts one model's layers in one scheme: layers and weight bytes per device, and whether
    `run` will refuse the split."""
    where = " · ".join(f"{device} {placement.layers.get(device, 0)} layers, {format_bytes(size)}"
                       for device, size in placement.weights_bytes.items())
    refused = f" (run refuses: {placement.refused})" if placement.refused else ""
    return f"{model} {dtype} under --device-map {placement.device_map}: {where}{refused}"


def placement_lines(rows: Sequence[PlanRow]) -> list[str]:
    """One placement line per model × scheme (context and batch do not move weights)."""
    seen = {(r.model, r.dtype): r.placement for r in rows if r.placement is not None}
    lines = [placement_line(model, dtype, placement) for (model, dtype), placement in seen.items()]
    return lines + ([PLACEMENT_NOTE] if lines else [])


PLACEMENT_NOTE = ("Placement: transformers' device-map rules (the first GPU, or the CPU, keeps room for the largest "
                  "layer; a tied head stays with the embeddings); only weights are placed, the KV cache and "
                  "activations come on top on the devices that run the layers.")


def plan_markdown(rows: Sequence[PlanRow]) -> str:
    return to_markdown(HEADERS, [_cells(r) for r in rows], RIGHT)


def plan_json(rows: Sequence[PlanRow]) -> str:
    return to_json([r.as_dict() for r in rows])


def plan_csv(rows: Sequence[PlanRow]) -> str:
    return to_csv([r.as_dict() for r in rows])
