"""The one view of fine-tuning rows, shared by `run --task finetune` and `report`: the tables' cells, their caption
and the CSV's fields. Console (Grid), Markdown and HTML all render these cells, as they do the inference rows'
(render/rows.py), with the same conventions: Δplan is (measured − planned) / planned.
"""

from __future__ import annotations

from typing import Callable, Sequence

from ..comparison import Comparison
from ..finetune import COMPONENTS as PARTS
from ..finetune import PHASES
from ..finetune_results import COMPONENT_NAMES, COMPONENTS, PHASE_NAMES, FinetuneResult
from .console import format_bytes, format_number, format_seconds, versus_plan
from .rows import VERSIONS, TableCells


Column = tuple[str, Callable[[FinetuneResult], str], bool]  # header, cell, right-aligned


def _loss(row: FinetuneResult) -> str:
    if row.first_loss is None:
        return "-"
    return f"{row.first_loss:.3f} → {row.last_loss:.3f}"


def _count(value: int | None) -> str:
    return format_number(value, ",d")


STEP_COLUMNS: tuple[Column, ...] = (
    ("Trainable", lambda r: _count(r.trainable_params), True),
    ("Δplan", lambda r: versus_plan(r.trainable_params, r.planned_trainable_params), True),
    ("Loss first → last", _loss, True),
    ("Step", lambda r: format_seconds(r.seconds_per_step), True),
    ("Tokens/s", lambda r: format_number(r.tokens_per_second, ",.1f"), True),
    ("Adapter", lambda r: format_bytes(r.adapter_bytes), True),
    ("Δplan", lambda r: versus_plan(r.adapter_bytes, r.planned_adapter_bytes), True),
    ("+ header", lambda r: _count(r.adapter_header_bytes) + " B" if r.adapter_header_bytes is not None else "-",
     True),
)

PEAK_HEADERS = {"forward": "Fwd", "backward": "Bwd", "optimizer": "Step"}
SHORT_NAMES = {c.name: c.short for c in PARTS}
DELTA_COLUMNS: tuple[Column, ...] = tuple(
    (SHORT_NAMES[name], lambda r, n=name: versus_plan(r.measured.get(n), r.planned.get(n)), True)
    for name in COMPONENTS) + tuple(
    (f"{PEAK_HEADERS[phase]} peak", lambda r, p=phase: versus_plan(r.measured_peaks.get(p), r.planned_peaks.get(p)),
     True) for phase in PHASES)


def _key_columns(comparison: Comparison) -> list[Column]:
    """Setup first (the column a narrow terminal repeats), then Run and Model where there are several, Status."""
    rows = comparison.finetune
    keys: list[Column] = [("Setup", lambda r: r.setup, False)]
    keys += [("Run", lambda r: r.run, False)] if len({r.run for r in rows}) > 1 else []
    keys += [("Model", lambda r: r.model, False)] if len({r.model for r in rows}) > 1 else []
    return keys + [("Status", lambda r: r.status, False)]


def _table(title: str, keys: Sequence[Column], figures: Sequence[Column], rows: Sequence[FinetuneResult]):
    shown = [c for c in figures if any(c[1](row) != "-" for row in rows)]
    if not shown:
        return None
    columns = list(keys) + shown
    return TableCells(title, tuple(c[0] for c in columns), tuple(tuple(c[1](r) for c in columns) for r in rows),
                      tuple(c[2] for c in columns), tuple(r.status != "ok" for r in rows))


def component_cells(row: FinetuneResult, where: str) -> TableCells:
    """One setup's memory, planned, measured and Δplan: component by component (those zero in both left out),
    then the peak of each phase."""
    body = [(COMPONENT_NAMES[name], format_bytes(row.planned.get(name)), format_bytes(row.measured.get(name)),
             versus_plan(row.measured.get(name), row.planned.get(name)))
            for name in COMPONENTS if row.planned.get(name) or row.measured.get(name)]
    body += [(f"Peak: {PHASE_NAMES[phase]}", format_bytes(row.planned_peaks.get(phase)),
              format_bytes(row.measured_peaks.get(phase)),
              versus_plan(row.measured_peaks.get(phase), row.planned_peaks.get(phase))) for phase in PHASES]
    return TableCells(f"Fine-tuning memory: {where} · {row.setup} · {row.status}",
                      ("Component", "Planned", "Measured", "Δplan"), tuple(body), (False, True, True, True),
                      (row.status != "ok",) * len(body))


def finetune_cells(comparison: Comparison) -> list[TableCells]:
    """The fine-tuning tables as text: the steps (trainable parameters, loss, speed, adapter), every setup's Δplan
    per component and phase peak at a glance, then each setup's memory, planned beside measured, component by
    component and phase by phase."""
    rows = list(comparison.finetune)
    if not rows:
        return []
    keys = _key_columns(comparison)
    tables = [_table("Fine-tuning steps", keys, STEP_COLUMNS, rows),
              _table("Fine-tuning memory, Δplan per component and per phase peak", keys[:-1], DELTA_COLUMNS, rows)]
    several = len({r.run for r in rows}) > 1
    tables += [component_cells(row, f"{row.run} · {row.model}" if several else row.model) for row in rows
               if any(v is not None for v in row.measured.values())]
    return [t for t in tables if t is not None]


def finetune_caption_lines(comparison: Comparison) -> list[str]:
    """What the fine-tuning figures mean, how they were measured, and each failed setup's error."""
    rows = comparison.finetune
    if not rows:
        return []
    sources = sorted({r.peak_source for r in rows if r.peak_source})
    lines = ["Fine-tuning: trainable parameters, gradients, optimizer states and 16-bit copies are counted tensor by "
             "tensor on the real model, activations and logits through torch's saved-tensor hooks (the first timed "
             "step); the plan is `plan --task finetune`'s. Adapter: the tensor bytes of peft's "
             "adapter_model.safetensors, the file less its header. Loss: the first step's and the last's, on the "
             "same batch of the shipped text.",
             f"Phase peaks: {', '.join(sources) or 'not measured'}; planned: what the plan says is alive then "
             "(forward: weights, optimizer states, saved activations, logits; backward: all but the optimizer step's "
             "temporaries; optimizer step: weights, gradients, states and its temporaries). On CPU the resident set "
             "keeps freed pages, so it reads above a phase's live tensors once an earlier phase was larger."]
    for run in dict.fromkeys(r.run for r in rows):
        same = [r for r in rows if r.run == run]
        first = same[0]
        versions = ", ".join(f"{name} {first.versions[name]}" for name in VERSIONS + ("peft",)
                             if first.versions.get(name))
        lines.append(f"{run}: {first.steps} timed step(s) after {first.warmup} warmup step(s) per setup"
                     + (f"; {versions}" if versions else ""))
    lines += [f"{r.setup}: {r.status}: {r.error}" for r in rows if r.error]
    for note in dict.fromkeys(n for r in rows for n in r.notes):
        noted = [r.setup for r in rows if note in r.notes]
        lines.append(f"{note} ({'every setup' if len(noted) == len(rows) else ', '.join(noted)})")
    return lines


FINETUNE_CSV_FIELDS: tuple[str, ...] = (
    "run", "model", "task", "status", "error", "device", "method", "dtype", "seq_len", "batch", "lora_r",
    "optimizer", "gradient_checkpointing", "trainable_params", "planned_trainable_params",
    *(f"{prefix}{name}" for name in COMPONENTS for prefix in ("", "planned_")),
    *(f"{prefix}{phase}_peak_bytes" for phase in PHASES for prefix in ("", "planned_")),
    "peak_source", "seconds_per_step", "tokens_per_second", "loss_first", "loss_last", "adapter_bytes",
    "planned_adapter_bytes", "adapter_file_bytes", "adapter_header_bytes",
)


def finetune_csv_row(row: FinetuneResult) -> dict:
    """One fine-tuning setup in raw units (bytes, seconds), for report.csv."""
    values = {name: getattr(row, name, None) for name in FINETUNE_CSV_FIELDS}
    values["task"] = "finetune"
    for name in COMPONENTS:
        values[name], values[f"planned_{name}"] = row.measured.get(name), row.planned.get(name)
    for phase in PHASES:
        values[f"{phase}_peak_bytes"] = row.measured_peaks.get(phase)
        values[f"planned_{phase}_peak_bytes"] = row.planned_peaks.get(phase)
    values["loss_first"], values["loss_last"] = row.first_loss, row.last_loss
    return values
