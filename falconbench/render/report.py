"""Rendering of `falconbench report`: the console table, and the Markdown, CSV and HTML files.

One list of columns feeds the console and Markdown tables; the CSV carries raw units (bytes, seconds) instead.
The HTML page is self-contained: inline CSS, plots as base64 data URIs, no script and no external resource.
"""

from __future__ import annotations

import base64
import html
from dataclasses import dataclass
from typing import Callable, Mapping, Sequence

from ..comparison import Comparison, SchemeRow
from .console import to_csv, to_markdown
from .finetune_rows import FINETUNE_CSV_FIELDS, finetune_caption_lines, finetune_cells, finetune_csv_row
from .rows import TableCells, caption_lines, settings_lines, table_cells

PLOT_TITLES = {
    "memory.png": "Memory by scheme: planned against measured",
    "latency.png": "Latency and throughput by scheme",
    "quality.png": "Quality drift by scheme",
    "context.png": "Planned memory against context length, with GPU capacities",
    "matrix-memory.png": "Measured peak at each point over the planned total, against context, by scheme",
    "scaling.png": "Latency and throughput against context and batch",
    "finetune.png": "Fine-tuning: memory per component planned against measured, and the loss over the steps",
}


def report_cells(comparison: Comparison) -> list[TableCells]:
    """The report's tables as text (the one row view `run` prints too): inference, then fine-tuning."""
    return table_cells(comparison) + finetune_cells(comparison)


def report_caption_lines(comparison: Comparison) -> list[str]:
    """The captions of the inference tables, then of the fine-tuning tables."""
    return (caption_lines(comparison) if comparison.rows else []) + finetune_caption_lines(comparison)


def report_tables(comparison: Comparison) -> list:
    """The comparison as width-aware tables for the console."""
    from rich import box

    from .console import Col, Grid

    return [Grid([Col(h, right=r) for h, r in zip(cells.headers, cells.right)], cells.body, title=cells.title,
                 box=box.SIMPLE_HEAD, row_styles=["red" if failed else None for failed in cells.failed])
            for cells in report_cells(comparison)]


def print_comparison(comparison: Comparison) -> None:
    """The runs, the tables and their caption on the console: what `run` and `report` both print."""
    from .console import console

    out = console()
    for line in run_lines(comparison):
        out.print(line, markup=False, highlight=False, soft_wrap=True)
    for table in report_tables(comparison):
        out.print(table)
    for line in report_caption_lines(comparison):
        out.print(line, markup=False, highlight=False)


def run_lines(comparison: Comparison) -> list[str]:
    """One line per run: its name, what it measured on, where it is."""
    def counts(run) -> str:
        parts = [f"{run.rows} row(s)"] if run.rows or not run.finetune_rows else []
        return ", ".join(parts + ([f"{run.finetune_rows} fine-tuning row(s)"] if run.finetune_rows else []))

    return [f"{run.name}: {run.device_name or 'unknown device'}, {counts(run)} from {run.folder}"
            for run in comparison.runs]


def caption(comparison: Comparison) -> str:
    return "\n".join(report_caption_lines(comparison))


def report_markdown(comparison: Comparison, images: Sequence[str] = (), problems: Sequence[str] = ()) -> str:
    """report.md: the runs, their settings, versions and machine, the tables, the plots (as files beside it), and
    the problems."""
    text = ["# falconbench report", ""] + [f"- {line}" for line in run_lines(comparison)] + [""]
    settings = settings_lines(comparison)
    if settings:
        text += ["## Settings and machine", ""] + [f"- {line}" for line in settings] + [""]
    for cells in report_cells(comparison):
        text += [f"## {cells.title}", "", to_markdown(cells.headers, cells.body, cells.right)]
    text += [line + "\n" for line in report_caption_lines(comparison)]
    text += [f"![{PLOT_TITLES.get(name, name)}]({name})\n" for name in images]
    if problems:
        text += ["## Problems and notes", ""] + [f"- {p}" for p in problems] + [""]
    return "\n".join(text)


CSV_FIELDS = (
    "task", "run", "model", "dtype", "status", "error", "attn", "prompt_tokens", "new_tokens", "batch", "cached_tokens",
    "weights_bytes", "planned_weights_bytes", "kv_cache_bytes", "planned_kv_cache_bytes", "peak_memory_bytes",
    "measured_runtime_bytes", "planned_runtime_bytes", "planned_total_bytes", "planned_activation_bytes",
    "planned_attention_scores_bytes", "planned_logits_bytes", "measured_prefill_runtime_bytes",
    "measured_decode_runtime_bytes", "quantized_layers", "linear_layers", "load_seconds", "ttft_seconds",
    "ttft_seconds_low", "ttft_seconds_high", "ttft_p90", "decode_token_seconds", "decode_token_seconds_low",
    "decode_token_seconds_high", "decode_token_p90", "decode_token_cv", "decode_tokens_per_second",
    "decode_tokens_per_second_low", "decode_tokens_per_second_high", "decode_bound_tokens_per_second",
    "bandwidth_share", "bandwidth_bytes_per_second", "spread", "perplexity", "perplexity_change",
    "perplexity_change_ci_low", "perplexity_change_ci_high", "kl_divergence", "kl_p95", "top1_agreement",
    "divergence_position", "divergence_is_tie", "greedy_tokens", "reference",
)


def _csv_row(row: SchemeRow) -> dict:
    values = {name: getattr(row, name, None) for name in CSV_FIELDS}
    values["task"] = "inference"
    spreads = {"ttft_seconds": row.ttft_spread, "decode_token_seconds": row.decode_token_spread,
               "decode_tokens_per_second": row.decode_spread}
    for name, spread in spreads.items():
        values[f"{name}_low"], values[f"{name}_high"] = (spread.low, spread.high) if spread else (None, None)
    values["spread"] = "; ".join(sorted({s.kind for s in spreads.values() if s}))
    values["perplexity_change_ci_low"], values["perplexity_change_ci_high"] = row.perplexity_change_ci or (None, None)
    return values


def report_csv(comparison: Comparison) -> str:
    """report.csv: one line per configuration, raw units (bytes, seconds, fractions); `task` tells inference
    rows from fine-tuning rows, whose columns follow the inference ones'."""
    fields = CSV_FIELDS if comparison.rows else ()
    if comparison.finetune:
        fields = ("task",) + tuple(f for f in fields + FINETUNE_CSV_FIELDS if f != "task")
    rows = [_csv_row(r) for r in comparison.rows] + [finetune_csv_row(r) for r in comparison.finetune]
    return to_csv(rows, fields)


def comparison_text(fmt: str, comparison: Comparison) -> str:
    """report.csv's text (`csv`) or report.md's (`markdown`) for a comparison: what `run --format` prints."""
    return report_csv(comparison) if fmt == "csv" else report_markdown(comparison)


STYLE = """
body { font-family: system-ui, sans-serif; margin: 2rem auto; max-width: 1200px; color: #222; padding: 0 1rem; }
table { border-collapse: collapse; font-size: 0.9rem; margin: 1rem 0; }
th, td { border: 1px solid #ccc; padding: 0.3rem 0.5rem; }
th { background: #f2f2f2; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
tr.failed td { color: #b00000; } .swatch { display: inline-block; width: 0.8em; height: 0.8em; margin-right: 0.3em; }
figure { margin: 1.5rem 0; } figure img { max-width: 100%; height: auto; border: 1px solid #eee; }
figcaption { font-size: 0.9rem; color: #555; } .caption { font-size: 0.85rem; color: #555; }
"""


def report_html(comparison: Comparison, images: Mapping[str, bytes], problems: Sequence[str] = ()) -> str:
    """report.html: one page with the tables and the plots embedded, readable offline and in any browser."""
    esc = html.escape
    runs = "".join(f"<li>{esc(line)}</li>" for line in run_lines(comparison))
    settings = settings_lines(comparison)
    if settings:
        runs += "</ul><h2>Settings and machine</h2><ul>" + "".join(f"<li>{esc(line)}</li>" for line in settings)
    tables = "".join(f"<h2>{esc(cells.title)}</h2>{_html_table(cells)}" for cells in report_cells(comparison))
    figures = "".join(
        f'<figure><img src="data:image/png;base64,{base64.b64encode(png).decode()}" '
        f'alt="{esc(PLOT_TITLES.get(name, name))}"><figcaption>{esc(PLOT_TITLES.get(name, name))} '
        f"({esc(name)})</figcaption></figure>" for name, png in images.items())
    problem_list = ("<h2>Problems and notes</h2><ul>" + "".join(f"<li>{esc(p)}</li>" for p in problems)
                    + "</ul>") if problems else ""
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>falconbench report</title>'
            f'<meta name="viewport" content="width=device-width, initial-scale=1"><style>{STYLE}</style></head>'
            f"<body><h1>falconbench report</h1><ul>{runs}</ul>{tables}"
            + "".join(f'<p class="caption">{esc(line)}</p>' for line in report_caption_lines(comparison))
            + f"{problem_list}{figures}</body></html>\n")


def _html_table(cells: TableCells) -> str:
    from ..plots import scheme_color

    esc = html.escape
    dtype_at = cells.headers.index("Dtype") if "Dtype" in cells.headers else None
    head = "".join(f"<th>{esc(h)}</th>" for h in cells.headers)
    rows = []
    for row, failed in zip(cells.body, cells.failed):
        tds = [f'<td class="num">{esc(c)}</td>' if right else f"<td>{esc(c)}</td>"
               for c, right in zip(row, cells.right)]
        if dtype_at is not None:
            tds[dtype_at] = (f'<td><span class="swatch" style="background:{scheme_color(row[dtype_at])}">'
                             f"</span>{esc(row[dtype_at])}</td>")
        rows.append(("<tr class='failed'>" if failed else "<tr>") + "".join(tds) + "</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(rows)}</tbody></table>"
