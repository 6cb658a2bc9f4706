"""Rendering of `falconbench fit`: a card × scheme table per context and batch, and the recommendation line."""

from __future__ import annotations

from typing import Sequence

from ..calibrate import QualityCost
from ..fit import FitResult, FitRow, Recommendation
from ..planner import CUDA_CONTEXT_BYTES
from .console import Col, Grid, format_bytes, format_percent, to_csv, to_json, to_markdown


def _speed(row: FitRow) -> str:
    return f"≤ {row.decode_tokens_per_second_bound:,.1f} tok/s"


def _context(row: FitRow) -> str:
    return f"{row.max_context:,}" + ("*" if row.max_context_beyond_positions else "")


def fit_cell(row: FitRow) -> str:
    """Mark and headroom, then the limits (or the split), the bandwidth bound, and a dtype hint."""
    if row.fits:
        lines = [f"✓ {format_bytes(row.headroom_bytes)} free", f"ctx ≤ {_context(row)}", f"batch ≤ {row.max_batch:,}"]
    elif row.gpus_needed:
        lines = [f"✗ x{row.gpus_needed} GPUs", f"{format_bytes(max(row.per_gpu_bytes))} each"]
    else:
        return "✗ a layer exceeds\nthe card"
    lines.append(_speed(row))
    if not row.dtype_supported:
        lines.append("no bf16: " + ("use fp16" if row.suggestion == "fp16" else "fp16 compute"))
    return "\n".join(lines)


def _blocks(result: FitResult) -> list[list[FitRow]]:
    """Rows grouped by (context, batch), in order."""
    blocks: dict[tuple[int, int], list[FitRow]] = {}
    for row in result.rows:
        blocks.setdefault((row.context, row.batch), []).append(row)
    return list(blocks.values())


def _header(dtype: str, rows: Sequence[FitRow]) -> str:
    calibrated = next(r.calibrated for r in rows if r.dtype == dtype)
    return dtype + ("\n(calibrated)" if calibrated else "")


def fit_table(rows: Sequence[FitRow]) -> Grid:
    """Cards as rows, schemes as columns, for one context and batch; schemes that do not fit the terminal's
    width continue in a second table."""
    first = rows[0]
    dtypes = list(dict.fromkeys(r.dtype for r in rows))
    title = f"falconbench fit: {first.model} · context {first.context:,} · batch {first.batch}"
    by_card: dict[str, dict[str, FitRow]] = {}
    for row in rows:
        by_card.setdefault(row.gpu, {})[row.dtype] = row
    body = []
    for gpu, cells in by_card.items():
        card = next(iter(cells.values()))
        label = f"{gpu}\n{format_bytes(card.memory_bytes)}\n{card.bandwidth_bytes_per_second / 1e9:,.0f} GB/s"
        body.append([label, *(fit_cell(cells[d]) if d in cells else "-" for d in dtypes)])
    columns = [Col("GPU")] + [Col(_header(d, rows)) for d in dtypes]
    return Grid(columns, body, title=title, caption=caption(rows), show_lines=True)


def caption(rows: Sequence[FitRow]) -> str:
    first = rows[0]
    text = (f"Fits when weights + KV cache + runtime ≤ memory × (1 − {first.margin:.0%}). Runtime: the "
            f"{format_bytes(CUDA_CONTEXT_BYTES)} CUDA context and prefill transients, planner estimates unless "
            "measured. ctx/batch: the largest on one card. xN: cards of that kind, whole layers per card as "
            "device_map=\"auto\" places them. tok/s: memory-bandwidth bound per sequence.")
    if any(r.max_context_beyond_positions for r in rows):
        text += f" *beyond the model's {first.position_limit:,} positions."
    for warning in dict.fromkeys(w for r in rows for w in r.warnings):
        text += f" Warning: {warning}."
    return text


def quality_text(quality: QualityCost | None) -> str:
    if quality is None or not quality.measured:
        return "quality cost: not measured"
    parts = []
    if quality.perplexity is not None:
        ref = ""
        if quality.reference and quality.reference_perplexity is not None:
            ref = (f" vs {quality.reference_perplexity:.3f} in {quality.reference} "
                   f"({format_percent(quality.perplexity_change)})")
        parts.append(f"perplexity {quality.perplexity:.3f}{ref}")
    if quality.kl_divergence is not None:
        parts.append(f"KL {quality.kl_divergence:.4f}")
    if quality.top1_agreement is not None:
        parts.append(f"top-1 agreement {format_percent(quality.top1_agreement, signed=False)}")
    return "measured quality cost: " + ", ".join(parts)


def recommendation_line(rec: Recommendation, calibrated: bool) -> str:
    """One sentence: the smallest card and scheme for this request, or the fewest cards when none holds it."""
    request = f"context {rec.context:,}, batch {rec.batch}"
    row = rec.row
    if row is None:
        return f"Recommendation ({request}): no card here holds this model, even split whole layer by layer."
    if row.fits:
        beyond = " (beyond the model's position limit)" if row.max_context_beyond_positions else ""
        if row.context_limited_by != "kv cache":
            beyond += " (set by the prefill activations: this model's cache does not grow with the context)"
        text = (f"Recommendation ({request}): {row.gpu} in {row.dtype}, {format_bytes(row.total_bytes)} of "
                f"{format_bytes(row.usable_bytes)} usable; up to {row.max_context:,} tokens{beyond} or batch "
                f"{row.max_batch:,}; {_speed(row)}")
    else:
        text = (f"Recommendation ({request}): no single card holds it; {row.gpus_needed} × {row.gpu} in "
                f"{row.dtype}, {format_bytes(max(row.per_gpu_bytes))} on the fullest; {_speed(row)}")
    if not row.dtype_supported:
        text += f"; {row.gpu} has no bf16: use {row.suggestion}"
    return text + (f"; {quality_text(rec.quality)}." if calibrated else ".")


def notes(result: FitResult) -> list[str]:
    """The recommendation lines, then what calibration used and skipped."""
    lines = [recommendation_line(r, bool(result.calibrations)) for r in result.recommendations]
    if result.calibration_source:
        used = "; ".join(f"{c.dtype} weights{' and runtime' if c.overhead_bytes is not None else ''} measured on "
                         f"{c.measured_on}" for c in result.calibrations)
        lines.append(f"Calibrated from {result.calibration_source}: {used}. Runtime = measured peak − weights − KV "
                     "at the run's context, plus the planner's growth of the transients to the asked context.")
        lines += [f"  {note}" for note in result.calibration_notes]
    if result.placements:
        from .plan import PLACEMENT_NOTE, placement_line

        lines += [placement_line(result.model, dtype, p) for dtype, p in result.placements] + [PLACEMENT_NOTE]
    return lines


def fit_tables(result: FitResult) -> list[Grid]:
    return [fit_table(block) for block in _blocks(result)]


MARKDOWN_HEADERS = ("GPU", "Dtype", "Context", "Batch", "Fits", "Headroom", "Max context", "Max batch", "GPUs",
                    "Per GPU", "Decode bound", "Notes")
MARKDOWN_RIGHT = (False, False, True, True, False, True, True, True, True, True, True, False)


def _markdown_cells(row: FitRow) -> list[str]:
    hint = [] if row.dtype_supported else [f"no bf16: use {row.suggestion}"]
    hint += ["calibrated: " + ", ".join(row.calibrated)] if row.calibrated else []
    hint += ["recommended"] if row.recommended else []
    return [row.gpu, row.dtype, f"{row.context:,}", str(row.batch), "yes" if row.fits else "no",
            format_bytes(row.headroom_bytes), _context(row), f"{row.max_batch:,}",
            str(row.gpus_needed) if row.gpus_needed else "-",
            format_bytes(max(row.per_gpu_bytes)) if row.per_gpu_bytes else "-", _speed(row), "; ".join(hint)]


def _results(results: FitResult | Sequence[FitResult]) -> list[FitResult]:
    return [results] if isinstance(results, FitResult) else list(results)


def fit_markdown(results: FitResult | Sequence[FitResult]) -> str:
    """One table per model, each followed by its recommendation notes."""
    parts = []
    for result in _results(results):
        table = to_markdown(MARKDOWN_HEADERS, [_markdown_cells(r) for r in result.rows], MARKDOWN_RIGHT)
        parts.append(table + "\n" + "\n\n".join(notes(result)) + "\n")
    return "\n".join(parts)


def fit_json(results: FitResult | Sequence[FitResult]) -> str:
    return to_json([r.as_dict() for result in _results(results) for r in result.rows])


def fit_csv(results: FitResult | Sequence[FitResult]) -> str:
    return to_csv([r.as_dict() for result in _results(results) for r in result.rows])


FORMATTERS = {"json": fit_json, "csv": fit_csv, "markdown": fit_markdown}
