"""Measured figures from a `falconbench run` that replace the planner's estimates in `fit`.

From each scheme's last `ok` row of the model: the measured weights replace the planned weights, and on CUDA the
measured runtime overhead, peak − weights − KV cache, replaces the planner's runtime estimate (CUDA context plus
prefill transients). A CPU run calibrates the weights only: resident memory on a CPU says nothing about a CUDA
context. The row's quality figures (perplexity against the reference scheme) come along for the recommendation.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from .errors import ResultsError
from .planner import kv_cache_bytes
from .results import GPU_NAME_KEYS, RunResult, as_float, as_mapping, environment_name, latest_rows, read_results
from .schemes import get_scheme, kv_dtype_bytes
from .spec import ArchSpec


@dataclass(frozen=True)
class QualityCost:
    """What a scheme costs in quality, as a run measured it; None where it was not measured."""

    perplexity: float | None = None
    reference: str | None = None
    reference_perplexity: float | None = None
    kl_divergence: float | None = None
    top1_agreement: float | None = None

    @property
    def measured(self) -> bool:
        return any(v is not None for v in (self.perplexity, self.kl_divergence, self.top1_agreement))

    @property
    def perplexity_change(self) -> float | None:
        """Relative to the reference: 0.05 means 5% higher perplexity."""
        if self.perplexity is None or not self.reference_perplexity:
            return None
        return self.perplexity / self.reference_perplexity - 1


@dataclass(frozen=True)
class Calibration:
    """One scheme's measured figures. `overhead_bytes` is None when the run was not on a CUDA device."""

    dtype: str
    weights_bytes: int
    overhead_bytes: int | None
    run_context: int  # tokens the run's cache held (measured KV ÷ KV bytes per token)
    run_batch: int
    measured_on: str
    quality: QualityCost = QualityCost()

    def __post_init__(self):
        if self.weights_bytes <= 0 or self.run_context <= 0 or self.run_batch <= 0:
            raise ValueError("a calibration needs positive weights bytes, run context and run batch")


@dataclass(frozen=True)
class CalibrationSet:
    """The calibrations read from one run folder, and what the reader had to say about it."""

    source: str
    items: tuple[Calibration, ...]
    notes: tuple[str, ...] = ()


def count(value: Any) -> int | None:
    """A byte count from a results row: a non-negative int, else None (rows come from files and may be odd)."""
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else None


def measured_on(row: RunResult) -> str:
    name = environment_name(row.environment, GPU_NAME_KEYS)
    return f"{name} ({row.device})" if name else str(row.device)


def run_point(spec: ArchSpec, row: RunResult) -> tuple[int, int]:
    """(context, batch) the run measured at: both from its settings (`cached_tokens`), or for older rows the
    context read back from the measured cache of a model whose cache grows with every token."""
    settings = as_mapping(row.settings)
    batch = count(settings.get("batch")) or 1
    cached = count(settings.get("cached_tokens"))
    if cached:
        return cached, batch
    width = kv_dtype_bytes("auto", get_scheme(row.dtype))
    per_token = kv_cache_bytes(spec, 1, batch, width)
    if not spec.cache_grows or not per_token:
        return 1, batch
    return max(1, (count(row.kv_cache_bytes) or 0) // per_token), batch


def overhead(row: RunResult) -> int | None:
    """Measured peak − measured weights − measured KV cache, on CUDA only; None when not measurable."""
    peak, weights, kv = count(row.peak_memory_bytes), count(row.weights_bytes), count(row.kv_cache_bytes)
    if row.device != "cuda" or None in (peak, weights, kv) or peak < weights + kv:
        return None
    return peak - weights - kv


def quality_cost(row: RunResult, ok_rows: dict[str, RunResult]) -> QualityCost:
    quality, settings = as_mapping(row.quality), as_mapping(row.settings)
    reference = quality.get("reference") or settings.get("reference")
    reference = reference if isinstance(reference, str) else None
    ref_ppl = as_float(quality.get("reference_perplexity"))
    if ref_ppl is None and reference in ok_rows:
        ref_ppl = as_float(ok_rows[reference].perplexity)
    return QualityCost(as_float(row.perplexity), reference, ref_ppl, as_float(row.kl_divergence), as_float(row.top1_agreement))


def usable_rows(folder: str, spec: ArchSpec, dtypes: Sequence[str],
                config_sha256: str | None = None) -> tuple[dict[str, RunResult], list[str]]:
    """The last ok row with measured weights per scheme of this model, and notes on what was skipped."""
    rows, problems = read_results(Path(folder))
    notes = [f"skipped {p}" for p in problems]
    rows = latest_rows(rows)

    def same_config(row: RunResult) -> bool:
        source = as_mapping(as_mapping(row.settings).get("model_source"))
        return config_sha256 is not None and source.get("config_sha256") == config_sha256

    mine = [r for r in rows if str(r.model).lower() == spec.name.lower() or same_config(r)]
    if rows and not mine:
        others = ", ".join(sorted({str(r.model) for r in rows}))
        raise ResultsError(f"{folder} holds results for {others}, not {spec.name}. Pass the --model that run "
                           f"measured, or a run folder of {spec.name}")
    ok = {r.dtype: r for r in mine if r.status == "ok" and count(r.weights_bytes)}
    if not any(d in ok for d in dtypes):
        found = ", ".join(f"{r.dtype} {r.status}" for r in mine) or "no valid rows"
        raise ResultsError(f"{folder} has no usable result for {spec.name} in {', '.join(dtypes)} (found: "
                           f"{found}). A usable row has status ok and measured weights_bytes; run `falconbench "
                           "run` for these dtypes, or choose the dtypes it measured")
    return ok, notes


def read_calibration(folder: str, spec: ArchSpec, dtypes: Sequence[str],
                     config_sha256: str | None = None) -> CalibrationSet:
    """Calibrations for the schemes in `dtypes` that the run in `folder` measured for this model (by name, or by
    the SHA-256 of its config.json, which `run` records)."""
    ok, notes = usable_rows(folder, spec, dtypes, config_sha256)
    items = []
    for dtype in dtypes:
        row = ok.get(dtype)
        if row is None:
            notes.append(f"{dtype}: not measured in this run; planned figures")
            continue
        measured = overhead(row)
        if measured is None:
            notes.append(f"{dtype}: weights measured; runtime stays the planner's estimate (the run on "
                         f"{row.device} gives no CUDA overhead)")
        context, batch = run_point(spec, row)
        items.append(Calibration(dtype, count(row.weights_bytes), measured, context, batch, measured_on(row),
                                 quality_cost(row, ok)))
    return CalibrationSet(str(folder), tuple(items), tuple(notes))
