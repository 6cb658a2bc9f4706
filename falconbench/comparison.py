"""The report's view of runs: one `SchemeRow` per results row in raw units, and the `Comparison` of runs.

A results row is read defensively: a value of the wrong type becomes None rather than a wrong figure, so a
report of a damaged or older file shows what is there and dashes for the rest.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable

from .gpus import GPU
from .results import STATUSES, RunResult, as_float, as_mapping

if TYPE_CHECKING:
    from .finetune_results import FinetuneResult

# With this many samples (decode steps, say) the extremes are outliers: show p10-p90 instead of min-max.
SAMPLES_FOR_PERCENTILES = 10


@dataclass(frozen=True)
class Spread:
    """The spread of a repeated measurement: `low`..`high`, and what they are (e.g. "min-max of 5 repeats")."""

    low: float
    high: float
    kind: str

    def __post_init__(self):
        if not (math.isfinite(self.low) and math.isfinite(self.high)) or self.low > self.high:
            raise ValueError(f"a spread needs finite low <= high, got {self.low!r}..{self.high!r}")


@dataclass(frozen=True)
class SchemeRow:
    """One configuration of one run, as the report shows it: bytes int, seconds float, None where not measured."""

    run: str
    model: str
    dtype: str
    status: str
    error: str | None = None
    batch: int = 1
    kv_dtype: str = "bf16"
    cached_tokens: int | None = None  # tokens in the KV cache at the end of the run
    attn: str | None = None  # attention kernel (sdpa, eager)
    prompt_tokens: int | None = None
    new_tokens: int | None = None
    weights_bytes: int | None = None
    kv_cache_bytes: int | None = None
    peak_memory_bytes: int | None = None
    planned_weights_bytes: int | None = None
    planned_kv_cache_bytes: int | None = None
    planned_total_bytes: int | None = None
    quantized_layers: int | None = None
    linear_layers: int | None = None
    quantized_params: int | None = None  # weights bitsandbytes holds, of `params`
    params: int | None = None
    unquantized_blocks: tuple[tuple[str, int], ...] = ()  # large 16-bit blocks left in a quantized model
    load_seconds: float | None = None
    ttft_seconds: float | None = None
    ttft_spread: Spread | None = None
    decode_token_seconds: float | None = None  # one decode step (a token for each sequence of the batch)
    decode_token_spread: Spread | None = None
    decode_tokens_per_second: float | None = None
    decode_spread: Spread | None = None  # of tokens per second
    perplexity: float | None = None
    perplexity_change: float | None = None  # (perplexity − reference's) / reference's: 0.05 = 5% higher
    perplexity_change_ci: tuple[float, float] | None = None
    kl_divergence: float | None = None  # nats per token, KL(reference ‖ scheme), mean
    kl_p95: float | None = None
    top1_agreement: float | None = None  # fraction of positions whose argmax matches the reference
    divergence_position: int | None = None  # first greedy token that differs from the reference's
    divergence_is_tie: bool = False  # the reference's top two logits tie there: the divergence is noise
    greedy_tokens: int | None = None
    # the planner's runtime estimates, and what prefill and decode added beyond weights and KV cache
    planned_activation_bytes: int | None = None
    planned_attention_scores_bytes: int | None = None
    planned_logits_bytes: int | None = None
    measured_prefill_runtime_bytes: int | None = None  # may be < 0 on CPU: freed pages reused
    measured_decode_runtime_bytes: int | None = None
    ttft_p90: float | None = None
    decode_token_p90: float | None = None
    decode_token_cv: float | None = None
    bandwidth_bytes_per_second: float | None = None  # the machine's copy bandwidth, as measured by the run
    device: str | None = None
    peak_source: str | None = None  # what the tracker read the peak from (NVML, torch, kernel RSS)
    reference: str | None = None
    model_paths: tuple[str, ...] = ()  # where else the model's config.json may be, for the planner
    model_config_sha256: str | None = None  # of the config the run measured, to check that a path still holds it
    placement: tuple[tuple[str, int], ...] = ()  # under a device map: (gpu0 / cpu / disk, decoder layers there)

    def __post_init__(self):
        if self.status not in STATUSES:
            raise ValueError(f"status must be one of {', '.join(STATUSES)}, not {self.status!r}")
        for name in ("weights_bytes", "kv_cache_bytes", "peak_memory_bytes", "planned_weights_bytes",
                     "planned_kv_cache_bytes", "planned_total_bytes"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 0):
                raise ValueError(f"{name} must be a non-negative integer or None, not {value!r}")

    @property
    def split(self) -> bool:
        """Whether a device map put the decoder layers on more than one device (GPU, CPU, disk)."""
        return len([n for _, n in self.placement if n]) > 1

    @property
    def planned_runtime_bytes(self) -> int | None:
        """The planner's estimate of everything beside weights and KV cache."""
        return _remainder(self.planned_total_bytes, self.planned_weights_bytes, self.planned_kv_cache_bytes)

    @property
    def measured_runtime_bytes(self) -> int | None:
        """Measured peak minus measured weights and KV cache; None when a part is missing or it comes out < 0."""
        return _remainder(self.peak_memory_bytes, self.weights_bytes, self.kv_cache_bytes)

    @property
    def planned_transient_bytes(self) -> int | None:
        """The planner's estimate of what prefill adds: activations, attention scores, logits."""
        parts = (self.planned_activation_bytes, self.planned_attention_scores_bytes, self.planned_logits_bytes)
        return None if None in parts else sum(parts)

    @property
    def decode_bound_tokens_per_second(self) -> float | None:
        """The memory-bandwidth bound of decoding at this point (see run/bandwidth.py)."""
        from .run.bandwidth import decode_bound_tokens_per_second, decode_kv_bytes

        if None in (self.bandwidth_bytes_per_second, self.weights_bytes, self.kv_cache_bytes, self.cached_tokens,
                    self.prompt_tokens) or not self.bandwidth_bytes_per_second:
            return None
        kv = decode_kv_bytes(self.kv_cache_bytes, self.cached_tokens, self.prompt_tokens)
        return decode_bound_tokens_per_second(self.bandwidth_bytes_per_second, self.weights_bytes, kv, self.batch)

    @property
    def bandwidth_share(self) -> float | None:
        """Measured decode tokens/s as a share of the bandwidth bound."""
        bound = self.decode_bound_tokens_per_second
        rate = self.decode_tokens_per_second
        return None if bound is None or rate is None else rate / bound



@dataclass(frozen=True)
class RunInfo:
    """One run folder: its short name (the folder's), its label (name and device), and its unusable lines."""

    name: str
    label: str
    folder: str
    device_name: str
    rows: int
    problems: tuple[str, ...] = ()
    settings: dict[str, Any] = field(default_factory=dict, compare=False)  # the first row's, shared by the run
    environment: dict[str, Any] = field(default_factory=dict, compare=False)
    finetune_rows: int = 0  # fine-tuning setups shown (their own tables)


@dataclass(frozen=True)
class ContextCurve:
    """The planner's total memory of one model in one scheme at each context length."""

    model: str
    dtype: str
    batch: int
    contexts: tuple[int, ...]
    total_bytes: tuple[int, ...]
    max_positions: int | None = None

    def __post_init__(self):
        if not self.contexts or len(self.contexts) != len(self.total_bytes):
            raise ValueError("a context curve needs one total per context, and at least one point")


@dataclass(frozen=True)
class PointCurve:
    """One load at one batch size: the planner's total against context on the run's own device, and the peaks
    measured at the matrix's points (context = tokens cached at the end)."""

    run: str
    model: str
    dtype: str
    attn: str
    batch: int
    device: str
    contexts: tuple[int, ...]
    planned_bytes: tuple[int, ...]
    measured: tuple[tuple[int, int], ...]  # (context, peak bytes) of each point that ran

    def __post_init__(self):
        if not self.contexts or len(self.contexts) != len(self.planned_bytes):
            raise ValueError("a point curve needs one planned total per context, and at least one point")


@dataclass(frozen=True)
class Comparison:
    """Everything a report shows, in raw units: runs, their rows, the planner's curves, and notes."""

    runs: tuple[RunInfo, ...]
    rows: tuple[SchemeRow, ...]
    curves: tuple[ContextCurve, ...] = ()
    point_curves: tuple[PointCurve, ...] = ()
    capacity_gpus: tuple[GPU, ...] = ()
    notes: tuple[str, ...] = ()
    finetune: tuple["FinetuneResult", ...] = ()  # the fine-tuning rows, in their own tables and plot

    def __post_init__(self):
        if not self.rows and not self.finetune:
            raise ValueError("a comparison needs at least one row")

    @property
    def problems(self) -> tuple[str, ...]:
        return tuple(p for run in self.runs for p in run.problems)

    @property
    def schemes(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(r.dtype for r in self.rows))

    @property
    def several_runs(self) -> bool:
        return len(self.runs) > 1

    @property
    def several_models(self) -> bool:
        return len({r.model for r in self.rows}) > 1


def _remainder(total: int | None, *parts: int | None) -> int | None:
    if total is None or any(p is None for p in parts):
        return None
    rest = total - sum(parts)
    return rest if rest >= 0 else None


def scheme_row(run: str, result: RunResult, folder: Path | None = None) -> SchemeRow:
    """The report's view of one results row; values of the wrong type are dropped, not trusted."""
    settings = as_mapping(result.settings)
    batch = _int(settings.get("batch")) or 1
    plan, memory, latency = as_mapping(result.plan), as_mapping(result.memory), as_mapping(result.latency)
    bandwidth = as_mapping(as_mapping(result.environment).get("copy_bandwidth")).get("bytes_per_second")
    return SchemeRow(
        run=run, model=str(result.model), dtype=str(result.dtype), status=result.status,
        error=str(result.error) if result.error else None, batch=batch,
        kv_dtype=str(settings.get("kv_dtype") or "bf16"), cached_tokens=_int(settings.get("cached_tokens")),
        attn=str(settings["attn_impl"]) if settings.get("attn_impl") else None,
        prompt_tokens=_int(settings.get("prompt_tokens")), new_tokens=_int(settings.get("new_tokens")),
        planned_activation_bytes=_int(plan.get("activation_bytes")),
        planned_attention_scores_bytes=_int(plan.get("attention_scores_bytes")),
        planned_logits_bytes=_int(plan.get("logits_bytes")),
        measured_prefill_runtime_bytes=_signed_int(memory.get("prefill_runtime_bytes")),
        measured_decode_runtime_bytes=_signed_int(memory.get("decode_runtime_bytes")),
        ttft_p90=as_float(as_mapping(latency.get("ttft_seconds")).get("p90")),
        decode_token_p90=as_float(as_mapping(latency.get("decode_token_seconds")).get("p90")),
        decode_token_cv=as_float(as_mapping(latency.get("decode_token_seconds")).get("cv")),
        bandwidth_bytes_per_second=as_float(bandwidth), device=str(result.device),
        peak_source=memory["peak_source"] if isinstance(memory.get("peak_source"), str) else None,
        weights_bytes=_int(result.weights_bytes), kv_cache_bytes=_int(result.kv_cache_bytes),
        peak_memory_bytes=_int(result.peak_memory_bytes), planned_weights_bytes=_int(result.planned_weights_bytes),
        planned_kv_cache_bytes=_int(result.planned_kv_cache_bytes),
        planned_total_bytes=_int(result.planned_total_bytes), quantized_layers=_int(result.quantized_layers),
        linear_layers=_int(result.linear_layers), load_seconds=as_float(result.load_seconds),
        quantized_params=_int(result.quantized_params), params=_int(result.params),
        unquantized_blocks=tuple((str(b[0]), b[1]) for b in memory.get("unquantized_blocks") or ()
                                 if isinstance(b, list) and len(b) == 2 and _int(b[1]) is not None),
        perplexity=as_float(result.perplexity), kl_divergence=as_float(result.kl_divergence),
        top1_agreement=as_float(result.top1_agreement), model_paths=_model_paths(settings, folder),
        model_config_sha256=as_mapping(settings.get("model_source")).get("config_sha256"),
        placement=tuple((str(d), n) for d, n in as_mapping(as_mapping(memory.get("placement")).get("layers")).items()
                        if _int(n) is not None),
        **_latency_fields(result, batch), **_quality_fields(as_mapping(result.quality)),
    )


def _latency_fields(result: RunResult, batch: int) -> dict[str, Any]:
    """TTFT, decode step and throughput with their spreads, from `latency` as `run` records it (summaries with
    samples per metric). A step's time falls back to batch / throughput when only the rate was recorded."""
    latency = as_mapping(result.latency)
    rate = as_float(result.decode_tokens_per_second)
    rate_spread = spread(latency, ("decode_tokens_per_second",))
    step = as_float(as_mapping(latency.get("decode_token_seconds")).get("median"))
    step_spread = spread(latency, ("decode_token_seconds",))
    if step is None and rate is not None and rate > 0:
        step = batch / rate
        step_spread = Spread(batch / rate_spread.high, batch / rate_spread.low, rate_spread.kind) \
            if rate_spread and rate_spread.low > 0 else None
    return dict(ttft_seconds=as_float(result.ttft_seconds), ttft_spread=spread(latency, ("ttft_seconds", "ttft")),
                decode_token_seconds=step, decode_token_spread=step_spread, decode_tokens_per_second=rate,
                decode_spread=rate_spread)


def _quality_fields(quality: dict[str, Any]) -> dict[str, Any]:
    """Relative perplexity change and its interval (from the absolute delta and the reference's perplexity that
    the quality measurement records), the KL tail, the greedy divergence and the reference's name."""
    reference_ppl = as_float(quality.get("reference_perplexity"))
    change = as_float(quality.get("delta_relative"))
    low, high = as_float(quality.get("delta_ci_low")), as_float(quality.get("delta_ci_high"))
    interval = (low / reference_ppl, high / reference_ppl) if None not in (low, high) and reference_ppl else None
    return dict(perplexity_change=change,
                perplexity_change_ci=interval if interval and interval[0] <= interval[1] else None,
                kl_p95=as_float(quality.get("kl_p95")), divergence_position=_int(quality.get("divergence_position")),
                divergence_is_tie=quality.get("divergence_is_tie") is True,
                greedy_tokens=_int(quality.get("greedy_tokens")),
                reference=str(quality["reference"]) if quality.get("reference") else None)


def _model_paths(settings: dict[str, Any], folder: Path | None) -> tuple[str, ...]:
    """Where the planner may find the model when its name no longer resolves: the model folder the run
    recorded, and a config.json kept in the run folder."""
    recorded = as_mapping(settings.get("model_source")).get("folder")
    paths = [str(recorded)] if isinstance(recorded, str) else []
    if folder is not None and (folder / "config.json").is_file():
        paths.append(str(folder / "config.json"))
    return tuple(paths)


def spread(latency: dict[str, Any], names: Iterable[str]) -> Spread | None:
    """The spread of the first metric in `names` that `latency` describes: from raw samples (min-max of a few
    repeats, p10-p90 of ten or more), else p10-p90, median-p90 or median ± CV as recorded. `latency[name]` may
    be a dict of these (as `run` writes it), or they may be flat keys such as `name_samples`."""
    from .run.stats import percentile

    for name in names:
        nested = latency.get(name)
        get = (lambda key: nested.get(key)) if isinstance(nested, dict) else (lambda key: latency.get(f"{name}_{key}"))
        raw = get("samples")
        samples = [x for x in map(as_float, raw) if x is not None] if isinstance(raw, list) else []
        if len(samples) >= SAMPLES_FOR_PERCENTILES:
            return _spread(percentile(samples, 10), percentile(samples, 90), f"p10-p90 of {len(samples)} samples")
        if len(samples) >= 2:
            return _spread(min(samples), max(samples), f"min-max of {len(samples)} repeats")
        p10, p90, median, cv = (as_float(get(k)) for k in ("p10", "p90", "median", "cv"))
        if p10 is not None and p90 is not None and p10 <= p90:
            return _spread(p10, p90, "p10-p90")
        if median is not None and p90 is not None:
            return _spread(min(median, p90), max(median, p90), "median-p90")
        if median is not None and cv is not None:
            return _spread(median * (1 - abs(cv)), median * (1 + abs(cv)), "median ± 1 SD")
    return None


def _spread(low: float, high: float, kind: str) -> Spread | None:
    """A Spread of times or rates, which are never negative; None for figures no measurement gives (a damaged
    file's), so a report shows no whisker rather than failing."""
    if not (math.isfinite(low) and math.isfinite(high)) or not 0 <= low <= high:
        return None
    return Spread(low, high, kind)


def _signed_int(value: Any) -> int | None:
    """An integer that may be negative (a difference of two measurements)."""
    if isinstance(value, bool) or not isinstance(value, int):
        return None
    return value


def _int(value: Any) -> int | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    if isinstance(value, float) and not (math.isfinite(value) and value.is_integer()):
        return None
    return int(value) if value >= 0 else None
