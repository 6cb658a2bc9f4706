"""Rendering of `falconbench run`: the live progress on stderr, the comparison table, the JSON rows."""

from __future__ import annotations

from typing import Sequence

from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich import box

from ..results import RunResult
from ..run.orchestrator import Event
from ..run.stats import ratio
from .console import (Col, Grid, err_console, format_bytes, format_number, format_percent, format_seconds, to_json,
                      versus_plan)

JSON_FIELDS = ("model", "dtype", "status", "error", "weights_bytes", "planned_weights_bytes", "kv_cache_bytes",
               "planned_kv_cache_bytes", "peak_memory_bytes", "planned_total_bytes", "load_seconds", "ttft_seconds",
               "decode_tokens_per_second", "quantized_layers", "linear_layers", "perplexity", "kl_divergence",
               "top1_agreement")
NOISY_CV = 0.25  # decode-step spread above which the table says the timings are not to be trusted
STATUS_STYLE = {"ok": "green", "oom": "red", "error": "red", "interrupted": "yellow", "skipped": "yellow"}


class RunProgress:
    """A progress bar over configurations, with the current configuration's phase, on stderr; where stderr is not
    a terminal (a pipe, a log), one line per phase as it starts instead, so a log shows where the run is."""

    def __init__(self):
        self.live = err_console().is_terminal
        self.progress = Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(),
                                 MofNCompleteColumn(), TimeElapsedColumn(), console=err_console(), transient=True)
        self.task = None
        self.started = False  # the bar starts with the first event, so an early error prints nothing else
        self.output_dir = None  # the run's folder, once the sweep has said it

    def __enter__(self) -> "RunProgress":
        return self

    def __exit__(self, *exc) -> None:
        if self.started:
            self.progress.__exit__(*exc)

    def __call__(self, event: Event) -> None:
        self.output_dir = event.output_dir or self.output_dir
        label = f"{event.config.dtype} ({event.index + 1}/{event.total})"
        if self.live and not self.started:
            self.progress.__enter__()
            self.started = True
        if self.task is None:
            self.task = self.progress.add_task(label, total=event.total)
        if event.kind == "start":
            self.phase(label, "starting a fresh process")
        elif event.kind == "phase":
            self.phase(label, event.phase)
        elif event.kind == "done" and event.row is not None:
            self.progress.advance(self.task)
            row = event.row
            style = STATUS_STYLE.get(row.status, "")
            detail = f": {escape(row.error)}" if row.error else ""
            resumed = " (already in the results file)" if event.resumed else ""
            self.progress.console.print(f"{row.dtype}: [{style}]{row.status}[/{style}]{resumed}{detail}")

    def phase(self, label: str, phase: str) -> None:
        if self.live:
            self.progress.update(self.task, description=f"{label}: {phase}")
        else:
            self.progress.console.print(f"{label}: {phase}", markup=False, highlight=False, soft_wrap=True)


def _rate(value: float | None) -> str:
    return "-" if value is None else f"{value:,.1f}"


def _times(value: float | None, reference: float | None) -> str:
    factor = ratio(value, reference)
    return "-" if factor is None else f"{factor:.2f}×"


def _detail(row: RunResult, name: str, key: str) -> float | None:
    return (row.latency.get(name) or {}).get(key)


def _status(row: RunResult) -> str:
    style = STATUS_STYLE.get(row.status, "")
    return f"[{style}]{row.status}[/{style}]"


def quantized_cell(row: RunResult) -> str:
    """The share of parameters bitsandbytes holds (layers for rows recorded before parameters were counted)."""
    if row.params:
        return f"{(row.quantized_params or 0) / row.params:.0%}"
    return "-" if row.linear_layers is None else f"{row.quantized_layers}/{row.linear_layers}"


def memory_cells(row: RunResult, ref: RunResult) -> list[str]:
    quantized = quantized_cell(row)
    return [
        row.dtype, _status(row), quantized, format_bytes(row.weights_bytes),
        _times(row.weights_bytes, ref.weights_bytes),
        versus_plan(row.weights_bytes, row.planned_weights_bytes),
        format_bytes(row.kv_cache_bytes),
        versus_plan(row.kv_cache_bytes, row.planned_kv_cache_bytes),
        format_bytes(row.peak_memory_bytes), _times(row.peak_memory_bytes, ref.peak_memory_bytes),
        format_bytes(row.planned_total_bytes),
        versus_plan(row.peak_memory_bytes, row.planned_total_bytes),
    ]


def speed_cells(row: RunResult, ref: RunResult) -> list[str]:
    return [
        row.dtype, _status(row), format_seconds(row.load_seconds), format_seconds(row.ttft_seconds),
        format_seconds(_detail(row, "ttft_seconds", "p90")), _times(row.ttft_seconds, ref.ttft_seconds),
        _rate(row.decode_tokens_per_second), _times(row.decode_tokens_per_second, ref.decode_tokens_per_second),
        format_seconds(_detail(row, "decode_token_seconds", "p90")),
        format_percent(_detail(row, "decode_token_seconds", "cv"), signed=False),
    ]


MEMORY_HEADERS = ("Dtype", "Status", "Quant.", "Weights", "×{ref}", "Δplan", "KV cache", "Δplan", "Peak", "×{ref}",
                  "Planned", "Δplan")
SPEED_HEADERS = ("Dtype", "Status", "Load", "TTFT", "TTFT p90", "×{ref}", "Decode tok/s", "×{ref}",
                 "Token p90", "Token CV")


def _table(title: str, headers: Sequence[str], body: list[list[str]], ref: str, caption: str = "") -> Grid:
    columns = [Col(header.format(ref=ref), right=header not in ("Dtype", "Status")) for header in headers]
    return Grid(columns, body, title=title, caption=caption, box=box.SIMPLE_HEAD, show_edge=False, markup=True,
                collapse_padding=True)


def quality_cells(row: RunResult) -> list[str]:
    q = row.quality
    low, high = q.get("delta_ci_low"), q.get("delta_ci_high")
    interval = f" [{low:+.3f}, {high:+.3f}]" if low is not None and high is not None and not q.get("is_reference") \
        else ""
    delta = "-" if q.get("delta_perplexity") is None else f"{q['delta_perplexity']:+.3f}{interval}"
    divergence = q.get("divergence_position")
    diverges = "-" if "greedy_tokens" not in q else (f"token {divergence}" if divergence is not None
                                                      else f"none of {q['greedy_tokens']}")
    return [row.dtype, _status(row), format_number(row.perplexity, ".3f"), delta, format_number(row.kl_divergence, ".4f"),
            format_number(q.get("kl_p95"), ".4f"), format_percent(row.top1_agreement, signed=False), diverges]


QUALITY_HEADERS = ("Dtype", "Status", "PPL", "Δ PPL [95% CI]", "KL mean", "KL p95", "Top-1", "Diverges at")


def run_tables(rows: Sequence[RunResult]) -> list[Grid]:
    """Memory and speed, one row per scheme, with ratios (×) to the first row, the reference; then quality
    against the reference scheme, when it was measured."""
    if not rows:
        return []
    # NOTE: a failed reference gives no ratios (its fields are None), which the cells show as "-".
    ref = rows[0]
    memory = _table(_title(rows), MEMORY_HEADERS, [memory_cells(r, ref) for r in rows], ref.dtype)
    speed = _table("", SPEED_HEADERS, [speed_cells(r, ref) for r in rows], ref.dtype, _caption(rows))
    tables = [memory, speed]
    measured = [r for r in rows if r.perplexity is not None]
    if measured:
        tables.append(_table("", QUALITY_HEADERS, [quality_cells(r) for r in rows], ref.dtype,
                             _quality_caption(rows)))
    return tables


def _quality_caption(rows: Sequence[RunResult]) -> str:
    q = next(r.quality for r in rows if r.perplexity is not None)
    lines = [f"Quality against {q['reference']} on {q['scored_tokens']:,} scored tokens of {escape(q['eval_text'])} "
             f"(tokens {q['token_hash']}, window {q['window']}, stride {q['stride']}). Δ PPL = perplexity − the "
             "reference's, absolute (falconbench report shows it relative, in %). KL(reference ‖ scheme) in nats "
             f"per token; Diverges at: first greedy token of {q['greedy_tokens']} that differs."]
    lines += [f"{r.dtype}: {escape(r.quality['skipped'])}" for r in rows if r.quality.get("skipped")]
    return "\n".join(lines)


def _title(rows: Sequence[RunResult]) -> str:
    if not rows:
        return "falconbench run"
    s, device = rows[0].settings, rows[0].device
    env = rows[0].environment
    hardware = env.get("gpu") or env.get("cpu") or device
    return (f"falconbench run: {rows[0].model} on {device} ({hardware}), prompt {s.get('prompt_tokens')} + "
            f"{s.get('new_tokens')} new tokens, batch {s.get('batch')}, {s.get('repeats')} repeats")


def _peak_meaning(rows: Sequence[RunResult]) -> str:
    """What Peak is: on CUDA, NVML's device use, or torch's peak reserved where the worker had no NVML (the
    source the tracker recorded); on CPU, the resident set."""
    if rows[0].device != "cuda":
        return "peak RSS − baseline"
    sources = [r.memory.get("peak_source") for r in rows if isinstance(r.memory, dict)]
    if any(isinstance(s, str) and s.startswith("torch") for s in sources):
        return "torch peak reserved (no NVML, so the CUDA context is not counted)"
    return "NVML device used − pre-run baseline"


def _caption(rows: Sequence[RunResult]) -> str:
    peak = _peak_meaning(rows)
    lines = ["Δplan: (measured − planned) / planned, in bytes where a percentage would round to zero; Planned is "
             "the planner's total (weights, KV cache, runtime estimate), set against the measured Peak.",
             f"Peak: {peak}. TTFT (prefill) and Decode: medians over the repeats; Token: one decode step."]
    noisy = [r.dtype for r in rows if (_detail(r, "decode_token_seconds", "cv") or 0) > NOISY_CV]
    if noisy:
        lines.append(f"Token CV above {NOISY_CV:.0%} ({', '.join(noisy)}): noisy timings, a busy machine? "
                     "Rerun with more --repeats.")
    lines += [f"{r.dtype}: {r.status}: {escape(r.error)}" for r in rows if r.error]
    for r in rows:
        blocks = r.memory.get("unquantized_blocks") if isinstance(r.memory, dict) else None
        if blocks and isinstance(blocks, list):
            named = ", ".join(f"{escape(str(b[0]))} ({format_percent(b[1] / r.params, signed=False)})"
                              for b in blocks if isinstance(b, list) and len(b) == 2 and r.params)
            lines.append(f"{r.dtype}: only {quantized_cell(r)} of the parameters are quantized; 16-bit blocks "
                         f"remain: {named} (fused MoE experts: bitsandbytes quantizes only nn.Linear).")
    if all(r.perplexity is None for r in rows):
        skipped = next((r.quality["skipped"] for r in rows if r.quality.get("skipped")), None)
        if skipped:
            lines.append(escape(skipped[:1].upper() + skipped[1:]) + ".")
    return "\n".join(lines)


def run_json(rows: Sequence[RunResult]) -> str:
    """Every row in full (the fields of JSON_FIELDS first), as a JSON list."""
    out = []
    for row in rows:
        data = row.as_dict()
        out.append({**{k: data[k] for k in JSON_FIELDS}, **data})
    return to_json(out)
