"""Rendering of fine-tuning: `plan --task finetune`, `fit --task finetune` and `run --task finetune` tables."""

from __future__ import annotations

from typing import Any, Sequence

from ..finetune import COMPONENTS, PHASES, FinetuneRow
from ..finetune_results import PHASE_NAMES
from ..finetune_fit import FinetuneFitResult, FinetuneFitRow
from .console import Col, Grid, format_bytes, to_csv, to_json, to_markdown


def _column(row: FinetuneRow) -> str:
    method = row.method + (f" r={row.lora_r}" if row.lora_r else "")
    return (f"{row.model}\n{method} {row.dtype}\nseq {row.seq_len:,} × {row.batch}\n{row.optimizer}"
            + (", ckpt" if row.gradient_checkpointing else ""))


def _plan_lines(rows: Sequence[FinetuneRow]) -> list[list[str]]:
    """Components as lines, one column per plan row."""
    lines = [["Parameters trained"] + [f"{r.trainable_params:,}" for r in rows]]
    lines += [[c.label + ("" if c.exact else "*")] + [format_bytes(getattr(r, c.name)) for r in rows]
              for c in COMPONENTS]
    peaks = [r.phase_peaks for r in rows]
    for phase in PHASES:
        lines.append([f"Peak: {PHASE_NAMES[phase]}"] + [format_bytes(p[phase]) for p in peaks])
    lines.append(["Total"] + [format_bytes(r.total_bytes) for r in rows])
    lines.append(["Adapter on disk"] + [format_bytes(r.adapter_bytes) if r.adapter_bytes is not None else "-"
                                        for r in rows])
    return lines


def plan_table(rows: Sequence[FinetuneRow]) -> Grid:
    """Components as lines, one column per setup; setups that do not fit the terminal continue in a second table."""
    columns = [Col("Component")] + [Col(_column(row), right=True) for row in rows]
    return Grid(columns, _plan_lines(rows), title="falconbench plan --task finetune", caption=PLAN_CAPTION)


PLAN_CAPTION = ("Weights, trainable parameters, gradients, optimizer state and 16-bit copies are exact; *the "
                "optimizer step's temporaries (torch AdamW: foreach's square roots of every second moment on CUDA, "
                "one tensor's at a time on CPU), activations saved for backward (Korthikanti et al. 2022, term by "
                "term), the layer a checkpointed backward recomputes, the logits around the loss and the CUDA "
                "context are estimates. Each phase's peak: what is alive then; Total: the highest, the step's peak. "
                "Adapter: its tensor bytes on disk (the safetensors file adds its header).")


def plan_markdown(rows: Sequence[FinetuneRow]) -> str:
    headers = ["Component"] + [_column(r).replace("\n", " · ") for r in rows]
    return to_markdown(headers, _plan_lines(rows), [False] + [True] * len(rows))


def plan_json(rows: Sequence[FinetuneRow]) -> str:
    return to_json([r.as_dict() for r in rows])


def plan_csv(rows: Sequence[FinetuneRow]) -> str:
    return to_csv([r.as_dict() for r in rows])


def fit_cell(row: FinetuneFitRow) -> str:
    if not row.fits:
        return f"✗ needs {format_bytes(row.total_bytes)}"
    lines = [f"✓ {format_bytes(row.headroom_bytes)} free", f"seq ≤ {row.max_seq_len:,}", f"batch ≤ {row.max_batch:,}",
             f"≤ {row.tokens_per_second_bound:,.0f} tok/s ({row.limited_by})"]
    if not row.dtype_supported:
        lines.append("no bf16: " + ("use fp16" if row.suggestion == "fp16" else "fp16 compute"))
    return "\n".join(lines)


def fit_table(result: FinetuneFitResult) -> Grid:
    """Cards as rows, setups as columns."""
    setups = list(dict.fromkeys((r.method, r.dtype, r.seq_len, r.batch) for r in result.rows))
    first = result.rows[0].plan
    title = (f"falconbench fit --task finetune: {result.model} · r={first.lora_r or '-'} · {first.optimizer}"
             + (" · gradient checkpointing" if first.gradient_checkpointing else ""))
    columns = [Col("GPU")]
    for method, dtype, seq_len, batch in setups:
        row = next(r for r in result.rows if (r.method, r.dtype, r.seq_len, r.batch) == (method, dtype, seq_len, batch))
        columns.append(Col(f"{method} {dtype}\nseq {seq_len:,} × {batch}\n{format_bytes(row.total_bytes)}"))
    body = [[gpu] + [fit_cell(r) + (" ★" if r.recommended else "") for r in result.rows if r.gpu == gpu]
            for gpu in dict.fromkeys(r.gpu for r in result.rows)]
    return Grid(columns, body, title=title, show_lines=True,
                caption=f"Each card keeps {result.rows[0].margin:.0%} free. {BOUND_CAPTION}")


BOUND_CAPTION = ("tok/s: the lower of two bounds, and which one limits: compute (the card's dense bf16/fp16 "
                 "peak over a step's FLOPs per token: 6N for full fine-tuning, about 4N for LoRA and QLoRA, 2N more "
                 "with checkpointing; Kaplan et al. 2020) and memory bandwidth (weights read in forward and backward, "
                 "optimizer state updated).")


def fit_notes(result: FinetuneFitResult) -> list[str]:
    best = result.recommended
    if best is None:
        return [f"No single card holds {result.model} in any of these setups. Try qlora, a shorter --seq-len, "
                "--gradient-checkpointing or an 8-bit optimizer."]
    return [f"★ Smallest card: {best.gpu} ({format_bytes(best.memory_bytes)}) for {best.method} {best.dtype} at "
            f"seq {best.seq_len:,} × batch {best.batch}: {format_bytes(best.total_bytes)} planned, "
            f"{format_bytes(best.headroom_bytes)} to spare, sequences up to {best.max_seq_len:,} tokens; ≤ "
            f"{best.tokens_per_second_bound:,.0f} tok/s ({best.limited_by}-bound: "
            f"{best.flops_per_token / 1e9:,.1f} GFLOPs per token)."]


def fit_json(result: FinetuneFitResult) -> str:
    return to_json([r.as_dict() for r in result.rows])


def fit_json_many(results: Sequence[FinetuneFitResult]) -> str:
    """One JSON list of every model's rows."""
    return to_json([r.as_dict() for result in results for r in result.rows])


def fit_markdown(result: FinetuneFitResult) -> str:
    headers = ("GPU", "Method", "Dtype", "Seq", "Batch", "Total", "Fits", "Headroom", "Max seq", "Max batch",
               "tok/s bound", "Limited by")
    body = [[r.gpu, r.method, r.dtype, f"{r.seq_len:,}", str(r.batch), format_bytes(r.total_bytes),
             ("yes" if r.fits else "no") + (" ★" if r.recommended else ""), format_bytes(r.headroom_bytes),
             f"{r.max_seq_len:,}", f"{r.max_batch:,}", f"{r.tokens_per_second_bound:,.0f}", r.limited_by]
            for r in result.rows]
    return to_markdown(headers, body, (False, False, False, True, True, True, False, True, True, True, True, False))


def fit_csv(result: FinetuneFitResult) -> str:
    return to_csv([{k: v for k, v in r.as_dict().items() if k != "plan"} for r in result.rows])


def run_json(rows: Sequence[dict[str, Any]]) -> str:
    """`run --task finetune --format json`: the rows as results.jsonl holds them (the tables are the report's:
    render/finetune_rows.py)."""
    return to_json(list(rows))
