"""The report's fine-tuning plot (finetune.png): each setup's memory per component, planned against measured, with
each phase's measured peak; and the loss over the steps. matplotlib is imported inside the functions only."""

from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

from .finetune import PHASES
from .finetune_results import COMPONENT_NAMES, COMPONENTS, PHASE_NAMES, FinetuneResult

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

    from .comparison import Comparison

# Okabe & Ito's palette (as plots.SCHEME_COLORS) and a grey: one colour per component of a training step.
COMPONENT_COLORS = {"frozen_weights_bytes": "#999999", "trainable_bytes": "#0072B2", "weight_copy_bytes": "#56B4E9",
                    "gradient_bytes": "#E69F00", "optimizer_bytes": "#D55E00", "step_temporary_bytes": "#8C510A",
                    "activation_bytes": "#009E73", "recompute_bytes": "#CC79A7", "logits_bytes": "#F0E442",
                    "logits_grad_bytes": "#000000"}
PLANNED_ALPHA = 0.4
PHASE_MARKERS = dict(zip(PHASES, ("v", "^", "s")))


def finetune_figure(comparison: "Comparison") -> "Figure | None":
    """Left: stacked components per setup, planned (light, left) and measured (right), and each phase's
    measured peak as a marker over the measured bar. Right: every step's loss, warmup included."""
    from .plots import _figure, byte_unit

    rows = [r for r in comparison.finetune if any(v for v in r.measured.values())]
    if not rows:
        return None
    several = len({r.run for r in rows}) > 1
    labels = [(f"{r.run}: " if several else "") + r.setup for r in rows]
    largest = max(max(sum(v or 0 for v in r.planned.values()), sum(v or 0 for v in r.measured.values()),
                      *(v or 0 for v in r.measured_peaks.values())) for r in rows)
    unit, size = byte_unit(largest)
    figure = _figure(max(9.0, 0.75 * len(rows) + 6.5), 5.2)
    memory, loss = figure.subplots(1, 2, width_ratios=(max(2.0, 0.45 * len(rows)), 1.4))
    for x, row in enumerate(rows):
        _stack(memory, x - 0.21, row.planned, size, PLANNED_ALPHA)
        _stack(memory, x + 0.21, row.measured, size, 1.0)
        for phase in PHASES:
            peak = row.measured_peaks.get(phase)
            if peak is not None:
                memory.plot(x + 0.21, peak / size, PHASE_MARKERS[phase], color="#333333", markersize=4)
    memory.set_xticks(range(len(rows)), labels, rotation=35, ha="right", fontsize=7)
    memory.set_ylabel(f"memory ({unit})")
    memory.set_ylim(0, largest / size * 1.1)
    memory.set_title("Per component: planned (light) vs measured; markers: measured phase peaks", fontsize=9)
    _losses(loss, rows, labels)
    figure.suptitle("Fine-tuning: memory planned against measured, and the loss over the steps")
    figure.legend(handles=_legend(), loc="outside lower center", ncols=6, fontsize=7, frameon=False)
    return figure


def _stack(ax: "Axes", x: float, parts: dict, size: int, alpha: float) -> None:
    bottom = 0.0
    for name in COMPONENTS:
        value = (parts.get(name) or 0) / size
        if value:
            ax.bar(x, value, 0.4, bottom=bottom, color=COMPONENT_COLORS[name], alpha=alpha, linewidth=0)
            bottom += value


def _losses(ax: "Axes", rows: Sequence[FinetuneResult], labels: Sequence[str]) -> None:
    for row, label in zip(rows, labels):
        if row.losses:
            ax.plot(range(1, len(row.losses) + 1), row.losses, marker="o", markersize=3, linewidth=1,
                    linestyle="--" if row.gradient_checkpointing else "-", label=label)
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("step (warmup first)")
    ax.set_ylabel("loss (nats / token)")
    ax.set_title("Loss on the same batch, each step", fontsize=9)
    ax.legend(fontsize=6, frameon=False)


def _legend() -> list:
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    handles: list = [Patch(color=COMPONENT_COLORS[name], label=COMPONENT_NAMES[name]) for name in COMPONENTS]
    handles += [Line2D([], [], marker=PHASE_MARKERS[p], color="#333333", linestyle="", label=f"peak: {PHASE_NAMES[p]}")
                for p in PHASES]
    return handles
