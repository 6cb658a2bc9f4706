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
from .console import (format_bytes, format_number, format_percent, format_seconds, to_csv, to_markdown,
                      versus_plan)

PLOT_TITLES = {
    "memory.png": "Memory by scheme: planned against measured",
    "latency.png": "Latency and throughput by scheme",
    "quality.png": "Quality drift by scheme",
    "context.png": "Planned memory against context length, with GPU capacities",
}


def _quantized(row: SchemeRow) -> str:
    if row.quantized_layers is None or row.linear_layers is None:
        return "-"
    return f"{row.quantized_layers}/{row.linear_layers}"


def _delta(row: SchemeRow) -> str:
    text = format_percent(row.perplexity_change)
    if row.perplexity_change_ci and row.perplexity_change is not None:
        low, high = row.perplexity_change_ci
        text += f" [{low * 100:+.1f}, {high * 100:+.1f}]"
    return text


def _divergence(row: SchemeRow) -> str:
    """The first generated token that differs from the reference's, or that none of N did."""
    if row.divergence_position is not None:
        return f"token {row.divergence_position}"
    return f"none of {row.greedy_tokens}" if row.greedy_tokens is not None else "-"


Column = tuple[str, Callable[[SchemeRow], str], bool]  # header, cell, right-aligned

MEMORY_COLUMNS: tuple[Column, ...] = (
    ("Weights", lambda r: format_bytes(r.weights_bytes), True),
    ("Δplan", lambda r: versus_plan(r.weights_bytes, r.planned_weights_bytes), True),
    ("KV cache", lambda r: format_bytes(r.kv_cache_bytes), True),
    ("Δplan", lambda r: versus_plan(r.kv_cache_bytes, r.planned_kv_cache_bytes), True),
    ("Peak", lambda r: format_bytes(r.peak_memory_bytes), True),
    ("Plan total", lambda r: format_bytes(r.planned_total_bytes), True),
    ("Quantized", _quantized, True),
)
SPEED_COLUMNS: tuple[Column, ...] = (
    ("Load", lambda r: format_seconds(r.load_seconds), True),
    ("TTFT", lambda r: format_seconds(r.ttft_seconds), True),
    ("Decode step", lambda r: format_seconds(r.decode_token_seconds), True),
    ("Decode tok/s", lambda r: format_number(r.decode_tokens_per_second, ".1f"), True),
)
QUALITY_COLUMNS: tuple[Column, ...] = (
    ("PPL", lambda r: format_number(r.perplexity, ".2f"), True),
    ("Δ PPL % [CI]", _delta, True),
    ("KL", lambda r: format_number(r.kl_divergence, ".4f"), True),
    ("KL p95", lambda r: format_number(r.kl_p95, ".4f"), True),
    ("Top-1", lambda r: format_percent(r.top1_agreement, signed=False), True),
    ("Greedy diverges", _divergence, True),
)
# Three tables rather than one of eighteen columns, so each fits a terminal.
TABLES: tuple[tuple[str, tuple[Column, ...]], ...] = (
    ("Memory", MEMORY_COLUMNS), ("Speed", SPEED_COLUMNS), ("Quality", QUALITY_COLUMNS))


@dataclass(frozen=True)
class TableCells:
    """One table as text: its title, headers, one row of cells per configuration, right alignment."""

    title: str
    headers: tuple[str, ...]
    body: tuple[tuple[str, ...], ...]
    right: tuple[bool, ...]
    failed: tuple[bool, ...]  # per row: its status is not ok


def _key_columns(comparison: Comparison) -> list[Column]:
    keys = [("Run", lambda r: r.run, False)] if comparison.several_runs else []
    keys += [("Model", lambda r: r.model, False)] if comparison.several_models else []
    return keys + [("Dtype", lambda r: r.dtype, False), ("Status", lambda r: r.status, False)]


def report_cells(comparison: Comparison) -> list[TableCells]:
    """The report's tables as text. A column empty in every row (quality never measured, say) is left out,
    and so is a table left with no column of figures."""
    tables = []
    for title, figures in TABLES:
        shown = [c for c in figures if any(c[1](row) != "-" for row in comparison.rows)]
        if not shown:
            continue
        columns = _key_columns(comparison) + shown
        body = tuple(tuple(cell(row) for _, cell, _ in columns) for row in comparison.rows)
        tables.append(TableCells(title, tuple(c[0] for c in columns), body, tuple(c[2] for c in columns),
                                 tuple(row.status != "ok" for row in comparison.rows)))
    return tables


def report_tables(comparison: Comparison) -> list:
    """The comparison as width-aware tables for the console."""
    from rich import box

    from .console import Col, Grid

    return [Grid([Col(h, right=r) for h, r in zip(cells.headers, cells.right)], cells.body, title=cells.title,
                 box=box.SIMPLE_HEAD, row_styles=["red" if failed else None for failed in cells.failed])
            for cells in report_cells(comparison)]


def run_lines(comparison: Comparison) -> list[str]:
    """One line per run: its name, what it measured on, where it is."""
    return [f"{run.name}: {run.device_name or 'unknown device'}, {run.rows} configuration(s) from {run.folder}"
            for run in comparison.runs]


def caption(comparison: Comparison) -> str:
    references = sorted({r.reference for r in comparison.rows if r.reference})
    text = ("Peak: measured peak memory above the baseline. Δplan: (measured − planned) / planned for the "
            "weights and KV cache, in bytes where a percentage would round to zero. Plan total adds the planner's "
            "runtime estimate.")
    if not references:
        return text
    return text + (f" Quality against {', '.join(references)}: Δ PPL % is (perplexity − the reference's) / the "
                   "reference's, in %, with its bootstrap confidence interval in brackets (falconbench run shows "
                   "it absolute).")


def report_markdown(comparison: Comparison, images: Sequence[str] = (), problems: Sequence[str] = ()) -> str:
    """report.md: the runs, the tables, the plots (as files beside it), and the problems."""
    text = ["# falconbench report", ""] + [f"- {line}" for line in run_lines(comparison)] + [""]
    for cells in report_cells(comparison):
        text += [f"## {cells.title}", "", to_markdown(cells.headers, cells.body, cells.right)]
    text += [caption(comparison), ""]
    text += [f"![{PLOT_TITLES.get(name, name)}]({name})\n" for name in images]
    if problems:
        text += ["## Problems and notes", ""] + [f"- {p}" for p in problems] + [""]
    return "\n".join(text)


CSV_FIELDS = (
    "run", "model", "dtype", "status", "error", "batch", "cached_tokens", "weights_bytes", "planned_weights_bytes",
    "kv_cache_bytes", "planned_kv_cache_bytes", "peak_memory_bytes", "measured_runtime_bytes",
    "planned_runtime_bytes", "planned_total_bytes", "quantized_layers", "linear_layers", "load_seconds",
    "ttft_seconds", "ttft_seconds_low", "ttft_seconds_high", "decode_token_seconds", "decode_token_seconds_low",
    "decode_token_seconds_high", "decode_tokens_per_second", "decode_tokens_per_second_low",
    "decode_tokens_per_second_high", "spread", "perplexity", "perplexity_change", "perplexity_change_ci_low",
    "perplexity_change_ci_high", "kl_divergence", "kl_p95", "top1_agreement", "divergence_position",
    "greedy_tokens", "reference",
)


def _csv_row(row: SchemeRow) -> dict:
    values = {name: getattr(row, name, None) for name in CSV_FIELDS}
    spreads = {"ttft_seconds": row.ttft_spread, "decode_token_seconds": row.decode_token_spread,
               "decode_tokens_per_second": row.decode_spread}
    for name, spread in spreads.items():
        values[f"{name}_low"], values[f"{name}_high"] = (spread.low, spread.high) if spread else (None, None)
    values["spread"] = "; ".join(sorted({s.kind for s in spreads.values() if s}))
    values["perplexity_change_ci_low"], values["perplexity_change_ci_high"] = row.perplexity_change_ci or (None, None)
    return values


def report_csv(comparison: Comparison) -> str:
    """report.csv: one line per configuration, raw units (bytes, seconds, fractions)."""
    return to_csv([_csv_row(r) for r in comparison.rows], CSV_FIELDS)


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
            f'<p class="caption">{esc(caption(comparison))}</p>{problem_list}{figures}</body></html>\n')


def _html_table(cells: TableCells) -> str:
    from ..plots import scheme_color

    esc = html.escape
    dtype_at = cells.headers.index("Dtype")
    head = "".join(f"<th>{esc(h)}</th>" for h in cells.headers)
    rows = []
    for row, failed in zip(cells.body, cells.failed):
        tds = [f'<td class="num">{esc(c)}</td>' if right else f"<td>{esc(c)}</td>"
               for c, right in zip(row, cells.right)]
        tds[dtype_at] = (f'<td><span class="swatch" style="background:{scheme_color(row[dtype_at])}"></span>'
                         f"{esc(row[dtype_at])}</td>")
        rows.append(("<tr class='failed'>" if failed else "<tr>") + "".join(tds) + "</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(rows)}</tbody></table>"
