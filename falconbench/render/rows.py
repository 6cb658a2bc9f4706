"""The one view of results rows, shared by `run` and `report`: the tables' columns and cells, their caption
(conventions and noise warnings) and the settings/machine lines. Console, Markdown and HTML all render these
cells; the CSV carries the same rows in raw units.

Conventions, the same everywhere: Δplan is (measured − planned) / planned; Δ PPL is relative, in %.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

from ..comparison import Comparison, SchemeRow
from .console import format_bytes, format_number, format_percent, format_seconds, versus_plan

PLACEMENT = "Placement"  # shown only when some row's layers were split over devices
NOISY_CV = 0.25  # decode-step spread above which the caption says the timings are not to be trusted


def _quantized(row: SchemeRow) -> str:
    """The share of parameters bitsandbytes holds (layers for rows recorded before parameters were counted)."""
    if row.params:
        return f"{(row.quantized_params or 0) / row.params:.0%}"
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
    """The first generated token that differs from the reference's (a tie when the reference's top two logits
    tie there), or that none of N did."""
    if row.divergence_position is not None:
        return f"token {row.divergence_position}" + (" (tie)" if row.divergence_is_tie else "")
    return f"none of {row.greedy_tokens}" if row.greedy_tokens is not None else "-"


def _signed_bytes(value: int | None) -> str:
    if value is None:
        return "-"
    return ("−" + format_bytes(-value)) if value < 0 else format_bytes(value)


def _rate(value: float | None) -> str:
    return format_number(value, ",.1f")


def _placement(row: SchemeRow) -> str:
    """Decoder layers per device under a device map (`gpu0 20 · cpu 10 · disk 2`); a row without one: its device."""
    if row.placement:
        return " · ".join(f"{device} {layers}" for device, layers in row.placement if layers)
    return "all " + ("gpu0" if row.device == "cuda" else str(row.device or "-"))


Column = tuple[str, Callable[[SchemeRow], str], bool]  # header, cell, right-aligned

MEMORY_COLUMNS: tuple[Column, ...] = (
    ("Weights", lambda r: format_bytes(r.weights_bytes), True),
    ("Δplan", lambda r: versus_plan(r.weights_bytes, r.planned_weights_bytes), True),
    ("KV cache", lambda r: format_bytes(r.kv_cache_bytes), True),
    ("Δplan", lambda r: versus_plan(r.kv_cache_bytes, r.planned_kv_cache_bytes), True),
    ("Peak", lambda r: format_bytes(r.peak_memory_bytes), True),
    ("Plan total", lambda r: format_bytes(r.planned_total_bytes), True),
    ("Δplan", lambda r: versus_plan(r.peak_memory_bytes, r.planned_total_bytes), True),
    ("Quantized", _quantized, True),
)
ESTIMATE_COLUMNS: tuple[Column, ...] = (
    ("Activations*", lambda r: format_bytes(r.planned_activation_bytes), True),
    ("Scores*", lambda r: format_bytes(r.planned_attention_scores_bytes), True),
    ("Logits*", lambda r: format_bytes(r.planned_logits_bytes), True),
    ("Planned", lambda r: format_bytes(r.planned_transient_bytes), True),
    ("Prefill", lambda r: _signed_bytes(r.measured_prefill_runtime_bytes), True),
    ("Δplan", lambda r: versus_plan(r.measured_prefill_runtime_bytes, r.planned_transient_bytes)
     if (r.measured_prefill_runtime_bytes or 0) > 0 else "-", True),
    ("Decode", lambda r: _signed_bytes(r.measured_decode_runtime_bytes), True),
)
SPEED_COLUMNS: tuple[Column, ...] = (
    ("Load", lambda r: format_seconds(r.load_seconds), True),
    ("TTFT", lambda r: format_seconds(r.ttft_seconds), True),
    ("TTFT p90", lambda r: format_seconds(r.ttft_p90), True),
    ("Step", lambda r: format_seconds(r.decode_token_seconds), True),
    ("Step p90", lambda r: format_seconds(r.decode_token_p90), True),
    ("Step CV", lambda r: format_percent(r.decode_token_cv, signed=False), True),
    (PLACEMENT, _placement, False),  # beside the rate: a split's cost is its rate against a one-device row's
    ("Decode tok/s", lambda r: _rate(r.decode_tokens_per_second), True),
    ("Bound", lambda r: _rate(r.decode_bound_tokens_per_second), True),
    ("Share", lambda r: format_percent(r.bandwidth_share, signed=False), True),
)
QUALITY_COLUMNS: tuple[Column, ...] = (
    ("PPL", lambda r: format_number(r.perplexity, ".2f"), True),
    ("Δ PPL % [CI]", _delta, True),
    ("KL", lambda r: format_number(r.kl_divergence, ".4f"), True),
    ("KL p95", lambda r: format_number(r.kl_p95, ".4f"), True),
    ("Top-1", lambda r: format_percent(r.top1_agreement, signed=False), True),
    ("Greedy diverges", _divergence, True),
)
# Four tables rather than one of thirty columns, so each fits a terminal. Quality is measured once per scheme (in
# its first attention kernel's load), so its table has one row per scheme, not per shape point.
TABLES: tuple[tuple[str, tuple[Column, ...], bool], ...] = (
    ("Memory", MEMORY_COLUMNS, False), ("Runtime estimates against measured", ESTIMATE_COLUMNS, False),
    ("Speed", SPEED_COLUMNS, False), ("Quality", QUALITY_COLUMNS, True))
SHAPE_COLUMNS: tuple[tuple[str, str], ...] = (
    ("Attn", "attn"), ("Prompt", "prompt_tokens"), ("New", "new_tokens"), ("Batch", "batch"))


@dataclass(frozen=True)
class TableCells:
    """One table as text: its title, headers, one row of cells per configuration, right alignment."""

    title: str
    headers: tuple[str, ...]
    body: tuple[tuple[str, ...], ...]
    right: tuple[bool, ...]
    failed: tuple[bool, ...]  # per row: its status is not ok


def _key_columns(comparison: Comparison, per_scheme: bool) -> list[Column]:
    """Run and Model where there are several; each shape axis that varies (not for the per-scheme table); then
    Dtype and Status."""
    rows = comparison.rows
    keys: list[Column] = [("Run", lambda r: r.run, False)] if comparison.several_runs else []
    keys += [("Model", lambda r: r.model, False)] if comparison.several_models else []
    keys += [("Dtype", lambda r: r.dtype, False)]
    for header, name in SHAPE_COLUMNS:
        if not per_scheme and len({getattr(r, name) for r in rows}) > 1:
            keys.append((header, lambda r, name=name: format_number(getattr(r, name), ",d")
                         if isinstance(getattr(r, name), int) else str(getattr(r, name) or "-"), name != "attn"))
    return keys + [("Status", lambda r: r.status, False)]


def per_scheme(rows: Sequence[SchemeRow]) -> list[SchemeRow]:
    """One row per scheme (run, model, dtype): its first with quality, else its first."""
    chosen: dict[tuple, SchemeRow] = {}
    for row in rows:
        key = (row.run, row.model, row.dtype)
        if key not in chosen or (chosen[key].perplexity is None and row.perplexity is not None):
            chosen[key] = row
    return list(chosen.values())


def table_cells(comparison: Comparison) -> list[TableCells]:
    """The tables as text. A column empty in every row (quality never measured, say) is left out, and so is a
    table left with no column of figures."""
    tables = []
    for title, figures, one_per_scheme in TABLES:
        rows = per_scheme(comparison.rows) if one_per_scheme else list(comparison.rows)
        shown = [c for c in figures if any(c[1](row) != "-" for row in rows)
                 and (c[0] != PLACEMENT or any(row.split for row in rows))]
        if not shown:
            continue
        columns = _key_columns(comparison, one_per_scheme) + shown
        body = tuple(tuple(cell(row) for _, cell, _ in columns) for row in rows)
        tables.append(TableCells(title, tuple(c[0] for c in columns), body, tuple(c[2] for c in columns),
                                 tuple(row.status != "ok" for row in rows)))
    return tables


def caption_lines(comparison: Comparison) -> list[str]:
    """What the tables' figures mean, then the warnings a reader must see beside them."""
    rows = comparison.rows
    lines = [f"Peak: {peak_meaning(rows)} while the point ran. Δplan: (measured − planned) / planned, in bytes where a percentage would round to "
             "zero. Plan total adds the planner's runtime estimate to weights and KV cache."]
    if any(r.planned_transient_bytes is not None for r in rows):
        lines.append("*Estimates of the planner (activations, eager attention's scores, logits), against what "
                     "prefill and decode added beyond weights and KV cache (CUDA: torch's allocations; CPU: resident "
                     "memory, which a reused freed page leaves unchanged, so it may read below the estimate, even "
                     "below zero).")
    if any(r.bandwidth_share is not None for r in rows):
        lines.append("Bound: decode tokens/s if a step only read the weights and the batch's KV cache at the "
                     "measured copy bandwidth; Share: the measured rate as a share of it. Step: one decode step "
                     "(a token for each sequence); p90 and CV over every step of the repeats.")
    if any(r.split for r in rows):
        lines.append("Placement: decoder layers per device, read from the loaded model's hf_device_map (transformers' "
                     "device map under --max-memory). Layers on the CPU beside a GPU are copied to it at every step, "
                     "layers on disk are read from disk at every step: the cost is the Decode tok/s of a split row "
                     "against a row all on one device. Weights counts every weight wherever it is. Bound and Share "
                     "assume every weight in memory: a split row's are against the memory copy bandwidth, not the "
                     "slower copies to the GPU or reads from disk that bound it.")
    references = sorted({r.reference for r in rows if r.reference})
    if references:
        lines.append(f"Quality against {', '.join(references)}, once per scheme: Δ PPL % is (perplexity − the "
                     "reference's) / the reference's, with its bootstrap confidence interval in brackets; KL(reference "
                     "‖ scheme) in nats per token; (tie): the reference's top two logits tie where the greedy tokens "
                     "part, so that divergence is noise.")
    noisy = sorted({r.dtype for r in rows if (r.decode_token_cv or 0) > NOISY_CV})
    if noisy:
        lines.append(f"Warning: step CV above {NOISY_CV:.0%} ({', '.join(noisy)}): noisy timings, a busy machine? "
                     "Rerun with more --repeats.")
    lines += [f"{r.dtype} {point_name(r)}: {r.status}: {r.error}" for r in rows if r.error]
    for r in per_scheme(rows):
        if r.unquantized_blocks and r.params:
            named = ", ".join(f"{name} ({format_percent(n / r.params, signed=False)})"
                              for name, n in r.unquantized_blocks)
            lines.append(f"{r.dtype}: only {_quantized(r)} of the parameters are quantized; 16-bit blocks remain: "
                         f"{named} (fused MoE experts: bitsandbytes quantizes only nn.Linear).")
    return lines


def point_name(row: SchemeRow) -> str:
    return f"{row.attn or '-'} prompt {row.prompt_tokens} + {row.new_tokens} × batch {row.batch}"


def peak_meaning(rows: Sequence[SchemeRow]) -> str:
    """What Peak is: on CUDA, NVML's device use, or torch's peak reserved where the worker had no NVML; on CPU,
    the resident set. Above the baseline the worker took before loading."""
    devices = {r.device for r in rows}
    meanings = []
    if "cuda" in devices:
        torch_only = any((r.peak_source or "").startswith("torch") for r in rows if r.device == "cuda")
        meanings.append("torch's peak reserved (no NVML, so the CUDA context is not counted)" if torch_only
                        else "NVML's device use")
    if devices - {"cuda"}:
        meanings.append("peak resident memory (RSS)")
    return " / ".join(meanings) + " above the baseline"


def settings_lines(comparison: Comparison) -> list[str]:
    """Per run: what was measured and how, with which versions, on which machine (its measured bandwidth too)."""
    lines = []
    for run in comparison.runs:
        s, env = run.settings, run.environment
        if not s and not env:
            continue
        quality = s.get("quality") or {}
        # NOTE: no KV dtype here: it is each scheme's compute dtype, so it differs between the rows of one run
        measured = (f"{s.get('repeats')} repeats after {s.get('warmup')} warmup run(s) per point, seed "
                    f"{s.get('seed')}")
        if quality:
            measured += (f"; quality on {quality.get('eval_tokens')} tokens of {quality.get('eval_text')} (window "
                         f"{quality.get('window')}, stride {quality.get('stride')}), reference "
                         f"{quality.get('reference')}")
        versions = ", ".join(f"{name} {env[name]}" for name in VERSIONS if env.get(name))
        bandwidth = as_dict(env.get("copy_bandwidth"))
        machine = ", ".join(str(x) for x in (env.get("gpu"), env.get("cpu"), env.get("cpu_count") and
                                              f"{env['cpu_count']} CPUs, {env.get('torch_threads')} torch threads")
                            if x)
        if bandwidth.get("bytes_per_second"):
            machine += f"; copy bandwidth {bandwidth['bytes_per_second'] / 1e9:,.1f} GB/s ({bandwidth.get('method')})"
        lines += [f"{run.name}: {measured}", f"{run.name} versions: {versions}", f"{run.name} machine: {machine}"]
    return lines


VERSIONS = ("falconbench", "python", "torch", "transformers", "bitsandbytes", "accelerate", "cuda", "driver")


def as_dict(value: Any) -> dict:
    return value if isinstance(value, dict) else {}
