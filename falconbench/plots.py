"""The report's PNG plots, drawn with matplotlib's Agg canvas (headless, no pyplot state).

matplotlib is imported inside the functions only, so importing this module costs nothing. Every plot colours a
scheme with `scheme_color`, the one palette table, so bf16 is the same blue in all of them.
"""

from __future__ import annotations

import io
from typing import TYPE_CHECKING, Callable, Sequence

from .comparison import Spread
from .plots_finetune import finetune_figure

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

    from .comparison import Comparison, SchemeRow

# Okabe & Ito's colour-blind-safe palette (Color Universal Design, 2008), one colour per scheme in SCHEMES.
SCHEME_COLORS = {
    "bf16": "#0072B2", "fp16": "#56B4E9", "int8": "#E69F00", "nf4": "#009E73", "nf4-dq": "#CC79A7",
    "fp4": "#D55E00", "fp32": "#555555",
}
OTHER_COLOR = "#999999"
# Memory parts are told apart by hatching, since colour already says the scheme.
PARTS = (("weights", ""), ("KV cache", "////"), ("runtime", "...."))
PLANNED_ALPHA = 0.4
DPI = 110
UNITS = (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10), ("B", 1))


def scheme_color(dtype: str) -> str:
    return SCHEME_COLORS.get(dtype, OTHER_COLOR)


def draw_plots(comparison: "Comparison") -> tuple[dict[str, bytes], tuple[str, ...]]:
    """Each plot as PNG bytes by file name, and a note for each plot there was nothing to draw for."""
    images, notes = {}, []
    for name, draw, why in PLOTS:
        figure = draw(comparison)
        if figure is None:
            # a plot of the matrix is no loss to a run of one shape per scheme, nor an inference plot to a run
            # of fine-tuning alone: no note for those
            if why and comparison.rows:
                notes.append(f"{name} skipped: {why}")
        else:
            images[name] = png_bytes(figure)
    return images, tuple(notes)


def png_bytes(figure: "Figure") -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=DPI, metadata={"Software": None})
    return buffer.getvalue()


def byte_unit(largest: float) -> tuple[str, int]:
    """The binary unit that keeps the largest value at 1 or more."""
    return next(((name, size) for name, size in UNITS if largest >= size), UNITS[-1])


def _figure(width: float, height: float) -> "Figure":
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), layout="constrained")


def _run_panels(figure: "Figure", comparison: "Comparison", columns: int) -> list[tuple[str, list["Axes"]]]:
    """One row of `columns` axes per run that has rows, titled with the run's name and device."""
    runs = _runs_with_rows(comparison)
    subfigures = figure.subfigures(len(runs), 1, squeeze=False)[:, 0]
    panels = []
    for run, subfigure in zip(runs, subfigures):
        subfigure.suptitle(run.label, fontsize=10, fontweight="bold")
        panels.append((run.name, list(subfigure.subplots(1, columns, squeeze=False)[0])))
    return panels


def _runs_with_rows(comparison: "Comparison") -> list:
    return [run for run in comparison.runs if any(r.run == run.name for r in comparison.rows)]


def _scheme_axis(ax: "Axes", rows: Sequence["SchemeRow"]) -> None:
    """A bar per row, named by its scheme, and by its shape where the rows are points of a matrix."""
    shaped = len({(r.attn, r.prompt_tokens, r.new_tokens, r.batch) for r in rows}) > 1
    ax.set_xticks(range(len(rows)), [f"{r.dtype}\n{r.prompt_tokens}×{r.batch}" if shaped else r.dtype
                                     for r in rows], fontsize=7 if shaped else None)
    ax.set_xlim(-0.6, len(rows) - 0.4)
    ax.grid(axis="y", alpha=0.3)
    ax.set_axisbelow(True)


def _status_marks(ax: "Axes", rows: Sequence["SchemeRow"], offset: float = 0.0) -> None:
    """Write a row's status (OOM, error...) where its bar would be, so a missing bar is never mistaken for zero."""
    for x, row in enumerate(rows):
        if row.status != "ok":
            ax.annotate(row.status.upper(), xy=(x + offset, 0.03), xycoords=("data", "axes fraction"),
                        rotation=90, ha="center", va="bottom", fontsize=8, color="#B00000")


def memory_figure(comparison: "Comparison") -> "Figure | None":
    """Stacked weights / KV cache / runtime bars per scheme: planned (light, left) against measured (right)."""
    stacks = [(r, _memory_parts(r, planned=True), _memory_parts(r, planned=False)) for r in comparison.rows]
    largest = max((sum(p) for _, *both in stacks for p in both if p), default=0)
    if not largest:
        return None
    unit, size = byte_unit(largest)
    figure = _figure(max(6.4, 1.1 * len(comparison.schemes) + 3), 3.8 * len(_runs_with_rows(comparison)) + 0.6)
    for label, (ax,) in _run_panels(figure, comparison, 1):
        rows = [s for s in stacks if s[0].run == label]
        for x, (row, planned, measured) in enumerate(rows):
            _stacked_bar(ax, x - 0.21, planned, size, scheme_color(row.dtype), PLANNED_ALPHA)
            _stacked_bar(ax, x + 0.21, measured, size, scheme_color(row.dtype), 1.0)
        _scheme_axis(ax, [s[0] for s in rows])
        _status_marks(ax, [s[0] for s in rows], offset=0.21)
        ax.set_ylim(0, largest / size * 1.08)
        ax.set_ylabel(f"memory ({unit})")
    figure.suptitle("Memory by scheme: planned (left, light) vs measured (right)")
    figure.legend(handles=_memory_legend(), loc="outside lower center", ncols=5, fontsize=8, frameon=False)
    return figure


def _memory_parts(row: "SchemeRow", planned: bool) -> tuple[int, int, int] | None:
    """(weights, KV cache, runtime) bytes, or None when the weights are unknown. Missing parts count as 0."""
    if planned:
        parts = (row.planned_weights_bytes, row.planned_kv_cache_bytes, row.planned_runtime_bytes)
    else:
        parts = (row.weights_bytes, row.kv_cache_bytes, row.measured_runtime_bytes)
    return None if parts[0] is None else tuple(p or 0 for p in parts)


def _stacked_bar(ax: "Axes", x: float, parts: tuple[int, ...] | None, size: int, color: str, alpha: float) -> None:
    if parts is None:
        return
    bottom = 0.0
    for value, (_, hatch) in zip(parts, PARTS):
        ax.bar(x, value / size, 0.4, bottom=bottom, color=color, alpha=alpha, hatch=hatch,
               edgecolor="white" if hatch else color, linewidth=0.5)
        bottom += value / size
    ax.annotate(f"{bottom:.3g}", xy=(x, bottom), xytext=(0, 1), textcoords="offset points", ha="center",
                va="bottom", fontsize=7, color="#333333")


def _memory_legend() -> list:
    from matplotlib.patches import Patch

    parts = [Patch(facecolor="#777777", edgecolor="white", hatch=hatch, label=name) for name, hatch in PARTS]
    return parts + [Patch(facecolor="#777777", alpha=PLANNED_ALPHA, label="planned"),
                    Patch(facecolor="#777777", label="measured")]


# (title, y label, value of a row in display units, its spread in display units)
Metric = tuple[str, str, Callable[["SchemeRow"], "float | None"], Callable[["SchemeRow"], "tuple | None"]]


def _scaled(spread: "Spread | None", scale: float) -> tuple[float, float] | None:
    return None if spread is None else (spread.low * scale, spread.high * scale)


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else seconds * 1e3


LATENCY_METRICS: tuple[Metric, ...] = (
    ("Time to first token", "TTFT (ms)", lambda r: _ms(r.ttft_seconds), lambda r: _scaled(r.ttft_spread, 1e3)),
    ("Decode latency per step", "ms / step (one token per sequence)", lambda r: _ms(r.decode_token_seconds),
     lambda r: _scaled(r.decode_token_spread, 1e3)),
    ("Decode throughput", "tokens / s", lambda r: r.decode_tokens_per_second, lambda r: _scaled(r.decode_spread, 1)),
)


def latency_figure(comparison: "Comparison") -> "Figure | None":
    """TTFT, per-token decode latency and decode tokens/s by scheme; whiskers show the measured spread."""
    return _metric_figure(comparison, LATENCY_METRICS, "Latency and throughput by scheme",
                          _spread_caption(comparison))


def _spread_caption(comparison: "Comparison") -> str:
    kinds = {s.kind for r in comparison.rows for s in (r.ttft_spread, r.decode_token_spread, r.decode_spread) if s}
    return f"whiskers: {', '.join(sorted(kinds))}" if kinds else "no spread recorded"


QUALITY_METRICS: tuple[Metric, ...] = (
    ("Perplexity change vs reference", "Δ perplexity (% of the reference's)",
     lambda r: None if r.perplexity_change is None else r.perplexity_change * 100,
     lambda r: _scaled(r.perplexity_change_ci and Spread(*r.perplexity_change_ci, "CI"), 100)),
    ("KL divergence from reference", "KL (nats / token)", lambda r: r.kl_divergence,
     lambda r: None if r.kl_p95 is None or r.kl_divergence is None else (r.kl_divergence, r.kl_p95)),
    ("Top-1 disagreement with reference", "positions whose top token differs (%)",
     lambda r: None if r.top1_agreement is None else (1 - r.top1_agreement) * 100, lambda r: None),
)


def quality_figure(comparison: "Comparison") -> "Figure | None":
    """Perplexity change (with its CI), KL divergence (mean, whisker to p95) and top-1 disagreement by scheme."""
    references = sorted({r.reference for r in comparison.rows if r.reference})
    caption = (f"reference: {', '.join(references)}; " if references else "") + \
        "whiskers: perplexity CI; KL mean to p95"
    return _metric_figure(comparison, QUALITY_METRICS, "Quality drift by scheme", caption)


def _metric_figure(comparison: "Comparison", metrics: Sequence[Metric], title: str,
                   caption: str) -> "Figure | None":
    """One bar chart per metric (columns) and per run (rows); None when no row has any of the metrics."""
    if not any(value(r) is not None for r in comparison.rows for _, _, value, _ in metrics):
        return None
    columns = len(metrics)
    figure = _figure(columns * max(4.0, 0.55 * len(comparison.schemes) + 1.2),
                     3.4 * len(_runs_with_rows(comparison)) + 0.8)
    limits = [_upper_limit(comparison.rows, metric) for metric in metrics]
    for label, axes in _run_panels(figure, comparison, columns):
        rows = [r for r in comparison.rows if r.run == label]
        for ax, metric, limit in zip(axes, metrics, limits):
            _metric_bars(ax, rows, metric, limit)
    figure.suptitle(title)
    figure.supxlabel(caption, fontsize=8, color="#444444")
    return figure


def _upper_limit(rows: Sequence["SchemeRow"], metric: Metric) -> tuple[float, float]:
    """A shared y range for one metric across runs, so two GPUs' panels compare at a glance."""
    _, _, value, spread = metric
    points = [v for r in rows for v in ((value(r),) + tuple(spread(r) or ())) if v is not None]
    low, high = min(points + [0.0]), max(points + [0.0])
    pad = (high - low) * 0.1 or 1.0
    return (low - pad if low < 0 else 0.0), high + pad


def _metric_bars(ax: "Axes", rows: Sequence["SchemeRow"], metric: Metric, limits: tuple[float, float]) -> None:
    name, ylabel, value, spread = metric
    for x, row in enumerate(rows):
        v = value(row) if row.status == "ok" else None
        if v is None:
            continue
        ax.bar(x, v, 0.6, color=scheme_color(row.dtype))
        whisker = spread(row)
        if whisker:
            low, high = min(whisker[0], v), max(whisker[1], v)
            ax.errorbar(x, v, yerr=[[v - low], [high - v]], fmt="none", ecolor="#222222", capsize=4, lw=1)
    _scheme_axis(ax, rows)
    _status_marks(ax, rows)
    ax.axhline(0, color="#222222", linewidth=0.6)
    ax.set_ylim(*limits)
    ax.set_title(name, fontsize=10)
    ax.set_ylabel(ylabel)


def context_figure(comparison: "Comparison") -> "Figure | None":
    """The planner's total memory against context for each scheme, with the capacity of a few GPUs."""
    if not comparison.curves:
        return None
    figure = _figure(9.0, 5.6)
    ax = figure.subplots()
    styles = dict(zip(dict.fromkeys(c.model for c in comparison.curves), ("-", "-.", ":", (0, (5, 1)))))
    drawn: dict[tuple, str] = {}
    for curve in comparison.curves:
        label = f"{curve.dtype} ({curve.model})" if len(styles) > 1 else curve.dtype
        twin = drawn.setdefault((curve.model, curve.total_bytes), curve.dtype)
        if twin != curve.dtype:  # the same bytes as a scheme already drawn (fp16 and bf16): dash it over
            label += f" (= {twin})"
        ax.plot(curve.contexts, [b / 2**30 for b in curve.total_bytes], "--" if twin != curve.dtype else
                styles.get(curve.model, "-"), marker="o", markersize=3, color=scheme_color(curve.dtype),
                label=label)
    _log_axes(ax, comparison)
    _capacity_lines(ax, comparison.capacity_gpus)  # after the log scale, which would reset the right axis' ticks
    _context_marks(ax, comparison)
    batches = ", ".join(map(str, sorted({c.batch for c in comparison.curves})))
    ax.set_title(f"Planned GPU memory against context (batch {batches}): weights + KV cache + estimated "
                 "runtime", fontsize=10)
    ax.set_xlabel("context length (tokens, log scale)")
    ax.set_ylabel("planned total memory (GiB, log scale)")
    figure.legend(title="scheme", fontsize=8, loc="outside lower center", ncols=min(len(comparison.curves), 7),
                  frameon=False)
    return figure


def _context_marks(ax: "Axes", comparison: "Comparison") -> None:
    """Dotted vertical lines at each model's maximum positions and at the context each run measured."""
    low = min(c for curve in comparison.curves for c in curve.contexts)
    top = max(c for curve in comparison.curves for c in curve.contexts)
    marks = {curve.max_positions: f"{curve.model} max positions" for curve in comparison.curves}
    marks.update({r.cached_tokens: "measured context" for r in comparison.rows})
    for tokens, text in sorted((t, m) for t, m in marks.items() if t and low <= t < top):
        ax.axvline(tokens, color="#888888", linestyle=":", linewidth=1)
        ax.annotate(f"{text} ({tokens:,})", xy=(tokens, 0.98), xycoords=("data", "axes fraction"), rotation=90,
                    ha="center", va="top", fontsize=8, color="#444444",
                    bbox={"boxstyle": "square,pad=0.1", "facecolor": "white", "edgecolor": "none"})


def _capacity_lines(ax: "Axes", gpus: Sequence) -> None:
    """A dashed line per GPU capacity, named on the right-hand axis so no label sits on the data; GPUs within
    5% of each other share one line."""
    groups: list[tuple[float, list[str]]] = []
    for gpu in sorted(gpus, key=lambda g: g.memory_bytes):
        gib = gpu.memory_bytes / 2**30
        if groups and gib <= groups[-1][0] * 1.05:
            groups[-1][1].append(gpu.name)
        else:
            groups.append((gib, [gpu.name]))
    for gib, _ in groups:
        ax.axhline(gib, color="#666666", linestyle="--", linewidth=0.8)
    right = ax.secondary_yaxis("right")
    right.set_yticks([gib for gib, _ in groups], [f"{' / '.join(names)} ({gib:.0f} GiB)" for gib, names in groups],
                     fontsize=8)
    right.minorticks_off()


def _log_axes(ax: "Axes", comparison: "Comparison") -> None:
    """Base-2 context ticks written as 256, 1k, 32k; memory ticks as plain GiB numbers."""
    from matplotlib.ticker import FuncFormatter, LogLocator

    contexts = sorted({c for curve in comparison.curves for c in curve.contexts})
    ax.set_xscale("log", base=2)
    ax.set_xticks(contexts, [f"{c // 1024}k" if c >= 1024 else str(c) for c in contexts])
    ax.minorticks_off()
    ax.set_yscale("log", base=10)
    ax.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    lows = [b / 2**30 for c in comparison.curves for b in c.total_bytes]
    highs = lows + [g.memory_bytes / 2**30 for g in comparison.capacity_gpus]
    ax.set_ylim(min(lows) / 1.5, max(highs) * 1.5)
    ax.grid(which="major", alpha=0.3)


BATCH_STYLES = ("-", "--", ":", "-.")
ATTN_MARKERS = {"sdpa": "o", "eager": "s"}


def matrix_memory_figure(comparison: "Comparison") -> "Figure | None":
    """Per scheme, the planner's total against context (a line per attention kernel and batch) and the peak
    measured at each point of the matrix (markers on it)."""
    curves = comparison.point_curves
    if not curves:
        return None
    schemes = list(dict.fromkeys(c.dtype for c in curves))
    figure = _figure(max(6.4, 4.2 * len(schemes)), 4.6)
    axes = figure.subplots(1, len(schemes), squeeze=False, sharey=True)[0]
    largest = max(max(c.planned_bytes + tuple(b for _, b in c.measured)) for c in curves)
    unit, size = byte_unit(largest)
    batches = sorted({c.batch for c in curves})
    for ax, dtype in zip(axes, schemes):
        for curve in (c for c in curves if c.dtype == dtype):
            style = BATCH_STYLES[batches.index(curve.batch) % len(BATCH_STYLES)]
            marker = ATTN_MARKERS.get(curve.attn, "D")
            label = f"{curve.attn}, batch {curve.batch}" + (f" ({curve.run})" if comparison.several_runs else "")
            ax.plot(curve.contexts, [b / size for b in curve.planned_bytes], style, color=scheme_color(dtype),
                    alpha=0.7, label=f"planned: {label}")
            ax.plot([c for c, _ in curve.measured], [b / size for _, b in curve.measured], marker, linestyle="none",
                    color=scheme_color(dtype), markeredgecolor="#222222", label=f"measured: {label}")
        ax.set_xscale("log", base=2)
        ticks = sorted({c for curve in curves for c, _ in curve.measured})
        ax.set_xticks(ticks, [f"{t:,}" for t in ticks])
        ax.minorticks_off()
        ax.set_title(dtype, fontsize=10)
        ax.set_xlabel("context: tokens cached (log scale)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, frameon=False)
    axes[0].set_ylabel(f"memory ({unit}): planned total, measured peak")
    devices = ", ".join(sorted({c.device for c in curves}))
    figure.suptitle(f"Measured peak at each point over the planned total ({devices}), by scheme")
    return figure


def scaling_figure(comparison: "Comparison") -> "Figure | None":
    """TTFT against prompt length and decode tokens/s against batch size, a line per load and other axis."""
    rows = [r for r in comparison.rows if r.status == "ok" and r.prompt_tokens and r.ttft_seconds is not None]
    prompts, batches = sorted({r.prompt_tokens for r in rows}), sorted({r.batch for r in rows})
    if len(prompts) < 2 and len(batches) < 2:
        return None
    figure = _figure(11.0, 4.4)
    left, right = figure.subplots(1, 2)
    several = comparison.several_runs
    for axis, x_of, other, others, ax in (("prompt", lambda r: r.prompt_tokens, "batch", batches, left),
                                          ("batch", lambda r: r.batch, "prompt", prompts, right)):
        y_of = (lambda r: r.ttft_seconds * 1e3) if axis == "prompt" else (lambda r: r.decode_tokens_per_second)
        other_of = (lambda r: r.batch) if axis == "prompt" else (lambda r: r.prompt_tokens)
        for run, dtype, attn, value in dict.fromkeys((r.run, r.dtype, r.attn, other_of(r)) for r in rows):
            line = sorted((x_of(r), y_of(r)) for r in rows if (r.run, r.dtype, r.attn, other_of(r)) ==
                          (run, dtype, attn, value) and y_of(r) is not None)
            label = f"{dtype} {attn} {other} {value}" + (f" ({run})" if several else "")
            ax.plot(*zip(*line), BATCH_STYLES[others.index(value) % len(BATCH_STYLES)],
                    marker=ATTN_MARKERS.get(attn, "D"), color=scheme_color(dtype), label=label)
        ticks = prompts if axis == "prompt" else batches
        ax.set_xscale("log", base=2)
        ax.set_xticks(ticks, [f"{t:,}" for t in ticks])
        ax.minorticks_off()
    for ax, xlabel, ylabel, title in ((left, "prompt tokens (log scale)", "TTFT (ms)", "Time to first token"),
                                      (right, "batch (log scale)", "decode tokens / s", "Decode throughput")):
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, frameon=False)
    figure.suptitle("Latency and throughput against context and batch (medians)")
    return figure


# (file, draw, why a plot can be missing); each draw returns None when there is nothing to draw.
PLOTS: tuple[tuple[str, Callable[["Comparison"], "Figure | None"], str], ...] = (
    ("memory.png", memory_figure, "no row has planned or measured memory"),
    ("latency.png", latency_figure, "no row measured latency or throughput"),
    ("quality.png", quality_figure, "no quality was measured (perplexity, KL, top-1)"),
    ("context.png", context_figure, "the planner could not resolve the runs' model"),
    ("matrix-memory.png", matrix_memory_figure, ""),  # drawn when a load measured two or more contexts
    ("scaling.png", scaling_figure, ""),  # drawn for two or more prompt lengths or batch sizes
    ("finetune.png", finetune_figure, ""),  # drawn for fine-tuning rows
)
PLOT_FILES = tuple(name for name, _, _ in PLOTS)
