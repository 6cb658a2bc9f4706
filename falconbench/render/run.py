"""Rendering of `falconbench run`: the live progress on stderr and the JSON rows (the tables are the report's:
render/rows.py)."""

from __future__ import annotations

from typing import Sequence

from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from ..results import RunResult
from ..run.orchestrator import Event
from .console import err_console, to_json

JSON_FIELDS = ("model", "dtype", "status", "error", "weights_bytes", "kv_cache_bytes", "peak_memory_bytes",
               "load_seconds", "ttft_seconds", "decode_tokens_per_second", "quantized_layers", "linear_layers",
               "perplexity", "kl_divergence", "top1_agreement", "plan")
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
        label = f"{point_label(event.config)} ({event.index + 1}/{event.total})"
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
            self.progress.console.print(f"{point_label(event.config)}: [{style}]{row.status}[/{style}]"
                                        f"{resumed}{detail}")

    def phase(self, label: str, phase: str) -> None:
        if self.live:
            self.progress.update(self.task, description=f"{label}: {phase}")
        else:
            self.progress.console.print(f"{label}: {phase}", markup=False, highlight=False, soft_wrap=True)


def point_label(config) -> str:
    """`bf16 sdpa p128+32 b1`: what a point of the matrix is, in a few characters."""
    return f"{config.dtype} {config.attn_impl} p{config.prompt_tokens}+{config.new_tokens} b{config.batch}"


def run_json(rows: Sequence[RunResult]) -> str:
    """Every row in full (the fields of JSON_FIELDS first), as a JSON list."""
    out = []
    for row in rows:
        data = row.as_dict()
        out.append({**{k: data[k] for k in JSON_FIELDS}, **data})
    return to_json(out)
