"""What a worker measures, phase by phase, as small typed values; and the one place a row is built from them.

Each phase of the worker returns its dataclass (load, speed per shape point, quality per load); a missing figure
fails where the phase builds its value, not when the row is assembled. Pure Python: the parent receives these
through the pipe and builds the row with `build_row`.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from datetime import datetime, timezone
from typing import Any

from ..quality.result import QualityResult
from ..results import RunResult


@dataclass(frozen=True)
class LoadMeasurement:
    """Loading one configuration: time, exact weights, the quantization guard's count, the load phase's memory."""

    seconds: float
    steps: dict[str, float]  # read / build / materialize / quantize
    weights_bytes: int
    quantized_layers: int
    linear_layers: int
    quantized_params: int  # weights bitsandbytes holds (logical elements), of `params`
    params: int
    unquantized_blocks: list[list]  # [module path, parameters] of large 16-bit blocks left in a quantized model
    quantized_by: dict[str, int]  # {"transformers": n, "falconbench": m}
    phase: dict[str, int]  # the tracker's figures for the load phase
    peak_bytes: int | None  # the load's peak above the baseline
    placement: dict[str, Any] | None = None  # under a device map: layers, parameters, bytes per device (Placement)


@dataclass(frozen=True)
class SpeedMeasurement:
    """One shape point: timings (summaries with their samples), the exact KV cache, and this point's memory."""

    ttft_seconds: dict[str, Any]  # median, p90, CV, samples
    decode_token_seconds: dict[str, Any] | None  # one decode step (None with a single new token)
    decode_tokens_per_second: dict[str, Any] | None
    generate_seconds: float | None
    kv_cache_bytes: int
    kv_cache_tokens: int
    prompt_kv_cache_bytes: int  # the cache right after prefill (the prompt's tokens)
    weights_bytes_after_run: int
    phases: dict[str, dict[str, int]]  # this point's prefill and decode figures
    peak_bytes: int | None  # the highest of this point's phases, above the baseline

    @property
    def prefill_runtime_bytes(self) -> int | None:
        """What prefill added beyond the prompt's KV cache: activations, attention scores, logits."""
        growth = self.phases.get("prefill", {}).get("growth_bytes")
        return None if growth is None else growth - self.prompt_kv_cache_bytes

    @property
    def decode_runtime_bytes(self) -> int | None:
        """What decoding added beyond the cache's growth: one token's activations, the cache's copies."""
        growth = self.phases.get("decode", {}).get("growth_bytes")
        return None if growth is None else growth - (self.kv_cache_bytes - self.prompt_kv_cache_bytes)


@dataclass(frozen=True)
class Measurement:
    """Everything one shape point measured; the parts a failure prevented are None."""

    environment: dict[str, Any]
    tracker: dict[str, Any]  # baseline and peak source (CPU RSS or NVML), CUDA context
    load: LoadMeasurement | None = None
    speed: SpeedMeasurement | None = None
    quality: QualityResult | None = None
    quality_skipped: str | None = None  # why quality was not measured, when it was asked for


def build_row(base: RunResult, status: str, error: str | None, measured: Measurement | None) -> RunResult:
    """The planned row completed with what was measured: the one place a row's measured fields are set."""
    values: dict[str, Any] = {"status": status, "error": error, "timestamp": now()}
    if status == "ok" and (measured is None or measured.load is None or measured.speed is None):
        missing = "measurement" if measured is None else "load" if measured.load is None else "speed"
        raise ValueError(f"an ok row needs its load and speed measurements; its {missing} is missing")
    if measured is None:
        return replace(base, **values)
    memory: dict[str, Any] = dict(measured.tracker)
    latency: dict[str, Any] = {}
    values["environment"] = measured.environment
    if measured.load is not None:
        load = measured.load
        # NOTE: the row's peak is its point's (prefill and decode); the load's own peak stays in `memory`
        values.update(load_seconds=load.seconds, weights_bytes=load.weights_bytes,
                      quantized_layers=load.quantized_layers, linear_layers=load.linear_layers,
                      quantized_params=load.quantized_params, params=load.params)
        latency["load_seconds"] = {**load.steps, "total": load.seconds}
        memory.update(quantized_by=load.quantized_by, load_peak_bytes=load.peak_bytes, phases={"load": load.phase})
        if load.placement:
            memory["placement"] = load.placement
        if load.unquantized_blocks:
            memory["unquantized_blocks"] = load.unquantized_blocks
    if measured.speed is not None:
        speed = measured.speed
        rate = speed.decode_tokens_per_second
        values.update(kv_cache_bytes=speed.kv_cache_bytes, peak_memory_bytes=speed.peak_bytes,
                      ttft_seconds=speed.ttft_seconds["median"], decode_tokens_per_second=rate and rate["median"])
        latency.update(ttft_seconds=speed.ttft_seconds, generate_seconds=speed.generate_seconds)
        if speed.decode_token_seconds is not None:
            latency.update(decode_token_seconds=speed.decode_token_seconds, decode_tokens_per_second=rate)
        memory.update(kv_cache_tokens=speed.kv_cache_tokens, prompt_kv_cache_bytes=speed.prompt_kv_cache_bytes,
                      weights_bytes_after_run=speed.weights_bytes_after_run,
                      prefill_runtime_bytes=speed.prefill_runtime_bytes,
                      decode_runtime_bytes=speed.decode_runtime_bytes,
                      phases={**memory.get("phases", {}), **speed.phases})
    if measured.quality is not None:
        values.update(measured.quality.as_fields())
    elif measured.quality_skipped:
        values["quality"] = {"skipped": f"quality not measured: {measured.quality_skipped}"}
    return replace(base, memory=memory, latency=latency, **values)


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")
