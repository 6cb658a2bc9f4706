"""`falconbench report`: one or several runs side by side, as files a person can read.

Each run's results.jsonl is read once with `read_results_file` (invalid lines become problems, never exceptions),
every valid row becomes a `SchemeRow` in raw units, the planner adds memory-against-context curves, and
`write_report` writes report.md, report.csv, report.html and the PNG plots atomically into the output folder.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

from .comparison import Comparison, ContextCurve, PointCurve, RunInfo, SchemeRow, scheme_row
from .errors import FalconbenchError, ResultsError
from .gpus import GPU, gpu_profiles
from .plots import PLOT_FILES
from .results import (RESULTS_FILE, RunResult, as_mapping, environment_name, latest_rows, read_results_file,
                      write_atomic)

REPORT_FILES = ("report.md", "report.csv", "report.html")
# GPUs drawn as capacity lines on the context plot: one per common memory size (16, 24, 40, 80 GB).
CAPACITY_GPUS = ("T4", "RTX-4090", "A100-40GB", "H100-80GB")


@dataclass(frozen=True)
class ReportResult:
    """What `write_report` wrote, and what it could not use."""

    out_dir: Path
    paths: tuple[Path, ...]
    comparison: Comparison
    plot_notes: tuple[str, ...] = field(default=())  # plots left out, and why

    @property
    def lines(self) -> tuple[str, ...]:
        """Every line a reader should see beside the table: failed rows, invalid lines, notes."""
        failed = tuple(f"{r.run}: {r.model} {r.dtype} {r.status}" + (f": {r.error}" if r.error else "")
                       for r in self.comparison.rows if r.status != "ok")
        return failed + self.comparison.problems + self.comparison.notes + self.plot_notes

    @property
    def problems(self) -> tuple[str, ...]:
        return self.comparison.problems


def load_comparison(run_dirs: Sequence[str | os.PathLike]) -> Comparison:
    """Read each run's results (the last row of each configuration, inference and fine-tuning) into one
    Comparison; raise when none is valid."""
    if not run_dirs:
        raise ResultsError("no run folder given. Pass the folder that `falconbench run` wrote")
    paths = [Path(d) for d in run_dirs]
    runs = []
    for path, name in zip(paths, _run_names(paths)):
        read = read_results_file(path)
        runs.append((name, str(path), _run_folder(path), latest_rows(read.inference),
                     [f"invalid row skipped: {p}" for p in read.problems], read.finetune))
    return comparison_of(runs)


RunRows = tuple  # (name, label of its folder, folder, rows, problem lines[, fine-tuning rows as dicts])


def finetune_comparison(folder: str | os.PathLike, rows: Sequence[dict]) -> Comparison:
    """The Comparison of one sweep's fine-tuning rows alone, named by its folder as `report` names it: what
    `run --task finetune` prints."""
    return comparison_of([(_run_names([Path(folder)])[0], str(folder), Path(folder), [], [], rows)])


def comparison_of(runs: Sequence[RunRows]) -> Comparison:
    """One Comparison of runs given as their rows (read from files, or straight from a sweep)."""
    infos, rows, finetune = [], [], []
    for name, label, folder, results, lines, *more in runs:
        lines = list(lines)
        shown = in_matrix_order(_scheme_rows(name, results, Path(folder), lines))
        tuned = _finetune_results(name, more[0] if more else (), Path(folder), lines)
        if not shown and not tuned:
            lines.append(f"{_results_path(Path(folder))}: no valid row")
        device = _device_name(results) or next((n for n in (environment_name(t.environment) for t in tuned) if n),
                                               tuned[0].device if tuned else "")
        first = results[0] if results else None
        infos.append(RunInfo(name, f"{name} ({device})" if device else name, label, device, len(shown),
                             tuple(lines), as_mapping(first.settings) if first else {},
                             as_mapping(first.environment) if first else {}, finetune_rows=len(tuned)))
        rows += shown
        finetune += tuned
    if not rows and not finetune:
        detail = "; ".join(p for run in infos for p in run.problems)
        raise ResultsError(f"no valid results row in {', '.join(run[1] for run in runs)} ({detail}). Pass the "
                           "folder of a run that finished at least one configuration, or rerun `falconbench run`")
    curves, notes = context_curves(rows)
    return Comparison(tuple(infos), tuple(rows), curves, point_curves(rows),
                      capacity_gpus([r.device_name for r in infos]) if rows else (), notes, tuple(finetune))


def _finetune_results(name: str, rows: Sequence[dict], folder: Path, lines: list[str]) -> list:
    """The fine-tuning rows of one run, the last of each setup (by config_hash) in first-seen order; a row that
    cannot be shown is a line in `lines`."""
    from .finetune_results import finetune_result

    latest: dict[str, dict] = {}
    for row in rows:
        latest[str(row.get("config_hash") or len(latest))] = row
    results = []
    for row in latest.values():
        try:
            results.append(finetune_result(name, row))
        except (ValueError, TypeError, ArithmeticError) as exc:
            lines.append(f"invalid fine-tuning row skipped: {folder / RESULTS_FILE}: {row.get('model')}: {exc}")
    return results


def _scheme_rows(name: str, results: Sequence[RunResult], folder: Path, lines: list[str]) -> list[SchemeRow]:
    """The report's rows of one run; a row whose figures cannot be shown is a line in `lines`, never a crash."""
    rows = []
    for result in results:
        try:
            rows.append(scheme_row(name, result, folder))
        except (ValueError, TypeError, ArithmeticError) as exc:
            lines.append(f"invalid row skipped: {folder / RESULTS_FILE}: {result.model} {result.dtype}: {exc}")
    return rows


def in_matrix_order(rows: Sequence[SchemeRow]) -> list[SchemeRow]:
    """Rows by scheme (first seen first: the reference), attention kernel, batch, prompt, new tokens: the same
    order whether read back from the file (in order of completion) or taken from the sweep."""
    dtypes = list(dict.fromkeys(r.dtype for r in rows))
    attns = list(dict.fromkeys(r.attn for r in rows))
    return sorted(rows, key=lambda r: (dtypes.index(r.dtype), attns.index(r.attn), r.batch, r.prompt_tokens or 0,
                                       r.new_tokens or 0))


def _results_path(path: Path) -> Path:
    return path / RESULTS_FILE if path.is_dir() or path.suffix != ".jsonl" else path


def _run_folder(path: Path) -> Path:
    return _results_path(path).parent


def _run_names(paths: Sequence[Path]) -> list[str]:
    """Each run's folder name, with its parent where two runs share a name."""
    names = [_run_folder(p).resolve().name or str(p) for p in paths]
    return [f"{_run_folder(p).resolve().parent.name}/{n}" if names.count(n) > 1 else n
            for p, n in zip(paths, names)]


def _device_name(results: Sequence[RunResult]) -> str:
    """What the run measured on: the GPU or CPU name its environment records, else its device."""
    names = (environment_name(result.environment) for result in results)
    return next((name for name in names if name), results[0].device if results else "")


def capacity_gpus(device_names: Iterable[str] = ()) -> tuple[GPU, ...]:
    """The GPUs drawn as capacity lines: a few common sizes, plus any profile the runs measured on."""
    def matches(gpu: GPU, device: str) -> bool:
        return all(part in device.lower() for part in gpu.name.lower().split("-"))

    chosen = [g for g in gpu_profiles() if g.name in CAPACITY_GPUS
              or any(matches(g, d) for d in device_names if d)]
    return tuple(sorted(chosen, key=lambda g: g.memory_bytes))


def context_curves(rows: Sequence[SchemeRow]) -> tuple[tuple[ContextCurve, ...], tuple[str, ...]]:
    """The planner's total memory (on a GPU) against context for each model and scheme in `rows`, and a note for
    each model it cannot plan (a folder that is gone, say): the plot then leaves that model out."""
    from .planner import plan_point
    from .schemes import get_scheme

    curves, notes = [], []
    for model, batch, kv_dtype in dict.fromkeys((r.model, r.batch, r.kv_dtype) for r in rows):
        same = [r for r in rows if (r.model, r.batch, r.kv_dtype) == (model, batch, kv_dtype)]
        spec, why = _model_spec([p for r in same for p in r.model_paths] + [model], same[0].model_config_sha256)
        if spec is None:
            notes.append(f"memory against context skipped for {model}: {why}")
            continue
        contexts = context_points(spec.max_positions, min((r.cached_tokens for r in same if r.cached_tokens),
                                                          default=None))
        for dtype in dict.fromkeys(r.dtype for r in same):
            try:
                totals = tuple(plan_point(spec, get_scheme(dtype), c, batch, kv_dtype).total_bytes for c in contexts)
            except FalconbenchError as exc:
                notes.append(f"memory against context skipped for {model} {dtype}: {exc}")
                continue
            curves.append(ContextCurve(model, dtype, batch, contexts, totals, spec.max_positions))
    order = [(r.model, r.dtype) for r in rows]
    return tuple(sorted(curves, key=lambda c: order.index((c.model, c.dtype)))), tuple(notes)


def point_curves(rows: Sequence[SchemeRow]) -> tuple[PointCurve, ...]:
    """For each load and batch that measured two or more contexts: the planner's total on the run's device from
    half the shortest to twice the longest context measured, and the measured peaks."""
    from .planner import plan_point
    from .schemes import get_scheme

    keys = dict.fromkeys((r.run, r.model, r.dtype, r.attn or "sdpa", r.batch, r.device or "cpu", r.kv_dtype)
                         for r in rows)
    curves = []
    for run, model, dtype, attn, batch, device, kv_dtype in keys:
        same = [r for r in rows if (r.run, r.model, r.dtype, r.attn or "sdpa", r.batch, r.device or "cpu") ==
                (run, model, dtype, attn, batch, device) and r.status == "ok" and r.cached_tokens
                and r.peak_memory_bytes is not None]
        measured = tuple(sorted((r.cached_tokens, r.peak_memory_bytes) for r in same))
        if len({c for c, _ in measured}) < 2:
            continue
        spec, _ = _model_spec([p for r in same for p in r.model_paths] + [model], same[0].model_config_sha256)
        if spec is None:
            continue
        low, high = measured[0][0] // 2, measured[-1][0] * 2
        contexts = sorted({2**k for k in range(max(low, 1).bit_length(), high.bit_length())} | {c for c, _ in measured})
        try:
            planned = tuple(plan_point(spec, get_scheme(dtype), c, batch, kv_dtype, attn, device).total_bytes
                            for c in contexts)
        except FalconbenchError:
            continue
        curves.append(PointCurve(run, model, dtype, attn, batch, device, tuple(contexts), planned, measured))
    return tuple(curves)


def _model_spec(candidates: Sequence[str], config_sha256: str | None):
    """The architecture from the first candidate (a path, or the model's name) that resolves to the config the
    run measured (same SHA-256 when the run recorded one, as `run` does); or None and the reason."""
    from .sources import resolve_model

    reasons = []
    for candidate in dict.fromkeys(candidates):
        try:
            source = resolve_model(candidate)
        except FalconbenchError as exc:
            reasons.append(str(exc))
            continue
        if config_sha256 and source.config_sha256 != config_sha256:
            reasons.append(f"{source.config_path} is not the config the run measured (SHA-256 differs)")
            continue
        return source.spec(), ""
    return None, "; ".join(reasons) or "no model named"


def context_points(max_positions: int | None, measured: int | None = None, longest: int = 32768,
                   cap: int = 131072) -> tuple[int, ...]:
    """Powers of two from 256 tokens (or from just below a shorter context a run measured, down to 64) to 32k,
    or to the model's own maximum when that is longer (up to 128k)."""
    top = min(max(longest, max_positions or 0), cap)
    bottom = min(256, max(64, 2 ** ((measured or 256).bit_length() - 1)))
    return tuple(2**k for k in range(bottom.bit_length() - 1, top.bit_length()) if 2**k <= top)


def write_report(run_dirs: Sequence[str | os.PathLike], out_dir: str | os.PathLike | None = None) -> ReportResult:
    """Write report.md, report.csv, report.html and the PNG plots of `run_dirs` into `out_dir` (default: the
    first run's folder). Each file is written whole or not at all; invalid rows are listed, not fatal."""
    from .render import report as render

    comparison = load_comparison(run_dirs)
    out = Path(out_dir) if out_dir is not None else _run_folder(Path(run_dirs[0]))
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ResultsError(f"cannot create {out}: {exc.strerror or exc}. Choose another --out folder") from None
    images, notes = _draw_plots(comparison)
    result = ReportResult(out, tuple(out / name for name in (*images, *REPORT_FILES)), comparison, notes)
    files = dict(images)
    files["report.md"] = render.report_markdown(comparison, tuple(images), result.lines).encode()
    files["report.csv"] = render.report_csv(comparison).encode()
    files["report.html"] = render.report_html(comparison, images, result.lines).encode()
    for name, data in files.items():
        write_atomic(out / name, data)
    for stale in set(PLOT_FILES) - set(images):  # a plot an earlier report drew and this one cannot
        (out / stale).unlink(missing_ok=True)
    return result


def _draw_plots(comparison: Comparison) -> tuple[dict[str, bytes], tuple[str, ...]]:
    """The PNGs by file name, and a note for each plot left out; no plots at all without matplotlib."""
    try:
        import matplotlib  # noqa: F401 - only to learn whether plots are possible
    except ImportError:
        return {}, ("plots skipped: matplotlib is not installed. Install it with pip install matplotlib",)
    from . import plots

    return plots.draw_plots(comparison)
