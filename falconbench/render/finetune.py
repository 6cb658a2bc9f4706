"""Rendering of fine-tuning: `plan --task finetune`, `fit --task finetune` and `run --task finetune` tables."""

from __future__ import annotations

from typing import Any, Sequence

from rich.table import Table

from ..finetune import FinetuneRow
from ..finetune_fit import FinetuneFitResult, FinetuneFitRow
from .console import format_bytes, format_seconds, to_csv, to_json, to_markdown, versus_plan

# (header, FinetuneRow field) per component, in the order a step allocates them.
COMPONENTS = (("Frozen weights", "frozen_weights_bytes"), ("Trainable", "trainable_bytes"),
              ("16-bit copies", "weight_copy_bytes"), ("Gradients", "gradient_bytes"),
              ("Optimizer", "optimizer_bytes"), ("Activations*", "activation_bytes"),
              ("Recompute*", "recompute_bytes"), ("Logits*", "logits_bytes"), ("Logits grad*", "logits_grad_bytes"),
              ("CUDA ctx*", "cuda_context_bytes"))


def _column(row: FinetuneRow) -> str:
    method = row.method + (f" r={row.lora_r}" if row.lora_r else "")
    return (f"{row.model}\n{method} {row.dtype}\nseq {row.seq_len:,} × {row.batch}\n{row.optimizer}"
            + (", ckpt" if row.gradient_checkpointing else ""))


def _plan_lines(rows: Sequence[FinetuneRow]) -> list[list[str]]:
    """Components as lines, one column per plan row."""
    lines = [["Trainable params"] + [f"{r.trainable_params:,}" for r in rows]]
    lines += [[header] + [format_bytes(getattr(r, name)) for r in rows] for header, name in COMPONENTS]
    lines.append(["Total"] + [format_bytes(r.total_bytes) for r in rows])
    lines.append(["Adapter on disk"] + [format_bytes(r.adapter_bytes) if r.adapter_bytes is not None else "-"
                                        for r in rows])
    return lines


def plan_table(rows: Sequence[FinetuneRow]) -> Table:
    table = Table(title="falconbench plan --task finetune", title_justify="left", caption_justify="left",
                  caption=PLAN_CAPTION)
    table.add_column("Component")
    for row in rows:
        table.add_column(_column(row), justify="right")
    for line in _plan_lines(rows):
        table.add_row(*line)
    return table


PLAN_CAPTION = ("Weights, trainable parameters, gradients, optimizer state and 16-bit copies are exact; *activations "
                "saved for backward (Korthikanti et al. 2022, term by term), the layer a checkpointed backward "
                "recomputes, the logits around the loss and the CUDA context are estimates. Total: all alive at the "
                "start of backward. Adapter: its tensor bytes on disk (the safetensors file adds its header).")


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
             f"≤ {row.tokens_per_second_bound:,.0f} tok/s"]
    if not row.dtype_supported:
        lines.append("no bf16: " + ("use fp16" if row.suggestion == "fp16" else "fp16 compute"))
    return "\n".join(lines)


def fit_table(result: FinetuneFitResult) -> Table:
    setups = list(dict.fromkeys((r.method, r.dtype, r.seq_len, r.batch) for r in result.rows))
    first = result.rows[0].plan
    title = (f"falconbench fit --task finetune: {result.model} · r={first.lora_r or '-'} · {first.optimizer}"
             + (" · gradient checkpointing" if first.gradient_checkpointing else ""))
    table = Table(title=title, title_justify="left", caption_justify="left", show_lines=True,
                  caption=f"Each card keeps {result.rows[0].margin:.0%} free. tok/s: a memory-bandwidth bound "
                          "(weights read in forward and backward, optimizer state updated), not a compute bound.")
    table.add_column("GPU")
    for method, dtype, seq_len, batch in setups:
        row = next(r for r in result.rows if (r.method, r.dtype, r.seq_len, r.batch) == (method, dtype, seq_len, batch))
        table.add_column(f"{method} {dtype}\nseq {seq_len:,} × {batch}\n{format_bytes(row.total_bytes)}")
    for gpu in dict.fromkeys(r.gpu for r in result.rows):
        cells = [fit_cell(r) + (" ★" if r.recommended else "") for r in result.rows if r.gpu == gpu]
        table.add_row(gpu, *cells)
    return table


def fit_notes(result: FinetuneFitResult) -> list[str]:
    best = result.recommended
    if best is None:
        return [f"No single card holds {result.model} in any of these setups. Try qlora, a shorter --seq-len, "
                "--gradient-checkpointing or an 8-bit optimizer."]
    return [f"★ Smallest card: {best.gpu} ({format_bytes(best.memory_bytes)}) for {best.method} {best.dtype} at "
            f"seq {best.seq_len:,} × batch {best.batch}: {format_bytes(best.total_bytes)} planned, "
            f"{format_bytes(best.headroom_bytes)} to spare, sequences up to {best.max_seq_len:,} tokens."]


def fit_json(result: FinetuneFitResult) -> str:
    return to_json([r.as_dict() for r in result.rows])


def fit_json_many(results: Sequence[FinetuneFitResult]) -> str:
    """One JSON list of every model's rows."""
    return to_json([r.as_dict() for result in results for r in result.rows])


def fit_markdown(result: FinetuneFitResult) -> str:
    headers = ("GPU", "Method", "Dtype", "Seq", "Batch", "Total", "Fits", "Headroom", "Max seq", "Max batch",
               "tok/s bound")
    body = [[r.gpu, r.method, r.dtype, f"{r.seq_len:,}", str(r.batch), format_bytes(r.total_bytes),
             ("yes" if r.fits else "no") + (" ★" if r.recommended else ""), format_bytes(r.headroom_bytes),
             f"{r.max_seq_len:,}", f"{r.max_batch:,}", f"{r.tokens_per_second_bound:,.0f}"] for r in result.rows]
    return to_markdown(headers, body, (False, False, False, True, True, True, False, True, True, True, True))


def fit_csv(result: FinetuneFitResult) -> str:
    return to_csv([{k: v for k, v in r.as_dict().items() if k != "plan"} for r in result.rows])


# `run --task finetune`: planned beside measured, per component.
MEASURED = (("Frozen weights", "frozen_weights_bytes"), ("Trainable", "trainable_bytes"),
            ("16-bit copies", "weight_copy_bytes"), ("Gradients", "gradient_bytes"), ("Optimizer", "optimizer_bytes"),
            ("Activations", "activation_bytes"), ("Recompute", "recompute_bytes"), ("Logits", "logits_bytes"),
            ("Logits grad", "logits_grad_bytes"), ("Adapter", "adapter_bytes"))


def run_cells(row: dict[str, Any]) -> list[list[str]]:
    """One line per component: planned, measured, and how far apart."""
    planned, measured = row.get("planned", {}), row.get("measured", {})
    return [[name, format_bytes(planned.get(key)), format_bytes(measured.get(key)),
             versus_plan(measured.get(key), planned.get(key))] for name, key in MEASURED
            if planned.get(key) or measured.get(key)]


def run_title(row: dict[str, Any]) -> str:
    p, m = row.get("planned", {}), row.get("measured", {})
    losses = m.get("losses") or []
    loss = " → ".join(f"{x:.3f}" for x in losses[:1] + losses[-1:]) if losses else "-"
    trainable = m.get("trainable_params")
    exact = "= planned" if trainable == p.get("trainable_params") else f"planned {p.get('trainable_params'):,}"
    return (f"{row['model']} · {p.get('method')} {p.get('dtype')} · seq {p.get('seq_len')} × {p.get('batch')}"
            + (" · ckpt" if p.get("gradient_checkpointing") else "") + f" · {row['status']}"
            + (f" · trainable {trainable:,} ({exact}) · loss {loss} · "
               f"{format_seconds(m.get('seconds_per_step'))}/step · {m.get('tokens_per_second', 0):,.0f} tok/s"
               if row["status"] == "ok" else f": {row.get('error')}"))


def run_tables(rows: Sequence[dict[str, Any]]) -> list[Table]:
    tables = []
    for row in rows:
        notes = "; ".join(row.get("measured", {}).get("notes") or [])
        table = Table(title=run_title(row), title_justify="left", caption=notes or None, caption_justify="left")
        for header, right in (("Component", False), ("Planned", True), ("Measured", True), ("Δplan", True)):
            table.add_column(header, justify="right" if right else "left")
        for cells in run_cells(row):
            table.add_row(*cells)
        phases = row.get("measured", {}).get("memory", {}).get("phases", {})
        baseline = row.get("measured", {}).get("memory", {}).get("rss_baseline_bytes", 0)
        for phase, values in phases.items():
            peak = values.get("rss_peak_bytes", values.get("torch_peak_allocated_bytes"))
            if peak is not None:
                table.add_row(f"peak in {phase}", "", format_bytes(peak - (baseline or 0)), "")
        tables.append(table)
    return tables


def run_markdown(rows: Sequence[dict[str, Any]]) -> str:
    """The README's planned-against-measured table: a line per run, each component measured and its Δplan."""
    shown = [(name, key) for name, key in MEASURED
             if any(r.get("planned", {}).get(key) or r.get("measured", {}).get(key) for r in rows)]
    headers = ("Method", "Seq", "Ckpt", *(name for name, _ in shown))
    body = []
    for row in rows:
        p, m = row.get("planned", {}), row.get("measured", {})
        cells = [f"{format_bytes(m.get(key))} ({versus_plan(m.get(key), p.get(key))})"
                 if p.get(key) or m.get(key) else "-" for _, key in shown]
        body.append([f"{p.get('method')} {p.get('dtype')}", str(p.get("seq_len")),
                     "yes" if p.get("gradient_checkpointing") else "no", *cells])
    return to_markdown(headers, body, (False, True, False) + (True,) * len(shown))


def run_json(rows: Sequence[dict[str, Any]]) -> str:
    return to_json(list(rows))



def run_summary_markdown(rows: Sequence[dict[str, Any]]) -> str:
    """One line per run: trainable parameters against the plan, the loss, the speed and each phase's peak."""
    headers = ("Method", "Seq", "Ckpt", "Status", "Trainable params", "Loss first → last", "Step", "tokens/s",
               "Peak forward", "Peak backward", "Peak optimizer", "Adapter file")
    body = []
    for row in rows:
        p, m = row.get("planned", {}), row.get("measured", {})
        memory = m.get("memory", {})
        baseline = memory.get("rss_baseline_bytes") or 0
        phases = memory.get("phases", {})
        peaks = [format_bytes(phases[ph]["rss_peak_bytes"] - baseline) if "rss_peak_bytes" in phases.get(ph, {})
                 else format_bytes(phases.get(ph, {}).get("torch_peak_allocated_bytes"))
                 for ph in ("forward", "backward", "optimizer")]
        losses = m.get("losses") or []
        trainable = m.get("trainable_params")
        body.append([f"{p.get('method')} {p.get('dtype')}", str(p.get("seq_len")),
                     "yes" if p.get("gradient_checkpointing") else "no", row.get("status", "-"),
                     f"{trainable:,} ({'= plan' if trainable == p.get('trainable_params') else 'plan ' + str(p.get('trainable_params'))})"
                     if trainable is not None else "-",
                     f"{losses[0]:.3f} → {losses[-1]:.3f}" if losses else "-",
                     format_seconds(m.get("seconds_per_step")),
                     f"{m['tokens_per_second']:,.0f}" if m.get("tokens_per_second") else "-", *peaks,
                     f"{m['adapter_file_bytes']:,} B = {m['adapter_bytes']:,} + {m['adapter_header_bytes']:,} header"
                     if m.get("adapter_file_bytes") else "-"])
    return to_markdown(headers, body, (False, True, False, False, True, False, True, True, True, True, True, False))
