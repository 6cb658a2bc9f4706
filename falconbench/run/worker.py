"""The spawned process that measures one configuration, and reports through a pipe.

One process per load configuration (scheme × attention kernel): it loads once, then measures each shape point.
Messages to the parent: {"kind": "phase", "index": i, "phase": ...} as work advances, one {"kind": "point",
"index": i, "status": ..., "error": ..., "measurement": Measurement} per point, in order, or {"kind": "failed"}
when the process cannot even start measuring. A measurement holds what was measured before any failure, so an
out-of-memory row still says what loading cost.
"""

from __future__ import annotations

import os
import statistics
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable

from ..errors import FalconbenchError, RunError
from ..sources import resolve_model
from .config import RunConfig
from .measurement import LoadMeasurement, Measurement, SpeedMeasurement
from .process import cap_memory, end_with_parent, redirect_output  # noqa: F401 - the worker's setup
from .stats import summarize

Emit = Callable[..., None]
# NOTE: "alloc_failed": cuBLAS's CUBLAS_STATUS_ALLOC_FAILED, how a GPU out of memory shows when a handle or
# workspace cannot be allocated (a RuntimeError, not torch.cuda.OutOfMemoryError)
# NOTE: "cannot allocate memory" is ENOMEM's text, as a failed mmap reports it (safetensors mapping the weights file
# under --memory-cap before any tensor is allocated)
OOM_MESSAGES = ("out of memory", "can't allocate memory", "cannot allocate memory", "not enough memory",
                "failed to allocate", "alloc_failed")


def child_main(configs: list[dict[str, Any]], conn, log_path: str | None = None, output_dir: str | None = None,
               bandwidth: dict[str, Any] | None = None) -> None:
    """Entry point of the spawned process (a module-level function, as the spawn context needs): one load, then
    each of `configs` (its shape points, smallest first)."""
    end_with_parent()
    if log_path:
        redirect_output(log_path)
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    if not configs[0].get("allow_downloads"):  # never reach the hub unless the user allowed it
        os.environ.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")

    def emit(kind: str, **data: Any) -> None:
        conn.send({"kind": kind, **data})

    try:
        measure_load([RunConfig(**c) for c in configs], emit, Path(output_dir) if output_dir else None, bandwidth)
    except BaseException as exc:  # noqa: BLE001 - a failure before any point: the parent marks the points
        emit("failed", status=failure_status(exc), error=describe(exc))
    finally:
        conn.close()
        sys.stdout.flush()
        sys.stderr.flush()
        # NOTE: the rows are sent; skip the interpreter's teardown of torch and transformers (about 2.5 s of
        # module finalization per configuration, measured with benchmarks/run_overhead.py).
        os._exit(0)


def failure_status(exc: BaseException) -> str:
    return "oom" if is_oom(exc) else ("interrupted" if isinstance(exc, KeyboardInterrupt) else "error")


def is_oom(exc: BaseException) -> bool:
    """torch.cuda.OutOfMemoryError, MemoryError, or an allocator's RuntimeError (CPU: "can't allocate memory")."""
    if isinstance(exc, MemoryError):
        return True
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(exc, torch.cuda.OutOfMemoryError):
        return True
    return isinstance(exc, RuntimeError) and any(m in str(exc).lower() for m in OOM_MESSAGES)


def describe(exc: BaseException) -> str:
    """One line for the row: falconbench's own errors as they are, others with their type, trimmed."""
    text = str(exc) if isinstance(exc, FalconbenchError) else f"{type(exc).__name__}: {exc}"
    first = " ".join(text.split())
    return first if len(first) <= 500 else first[:497] + "..."


def quiet_libraries() -> None:
    """No progress bars in the log; transformers' warnings stay (the log is where a crash is explained)."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()


def measure_load(points: list[RunConfig], emit: Emit, output_dir: Path | None,
                 bandwidth: dict[str, Any] | None = None) -> None:
    """Load once, score quality once, then measure every shape point in order, each sent as its own result. An
    out-of-memory point is its row; the points that need at least as much are sent as skipped."""
    from . import environment, trackers

    from .devicemap import with_offload_folder

    first = with_offload_folder(points[0], output_dir)
    source = resolve_model(first.model)
    emit("phase", index=0, phase="setup")
    tracker = trackers.make_tracker(first.device)
    tracker.read_baseline()
    import torch

    torch.manual_seed(first.seed)
    from . import loading

    loading.import_libraries(first, source)
    quiet_libraries()
    env = environment.environment(first.device, getattr(tracker, "nvml", None))
    env["copy_bandwidth"] = bandwidth or measure_bandwidth(first.device)
    release_memory(first.device)  # the copy's buffers are not the model's
    if first.memory_cap_bytes:
        cap_memory(first.memory_cap_bytes)
    tracker.start()
    base = Measurement(env, tracker_summary(tracker))
    try:
        model, load = load_phase(first, source, tracker, emit)
    except LoadFailed as failed:
        for index in range(len(points)):
            emit("point", index=index, status=failure_status(failed.cause), error=describe(failed.cause),
                 measurement=replace(base, load=failed.load, tracker=tracker_summary(tracker)))
        return
    base = replace(base, load=load, tracker=tracker_summary(tracker))
    if first.quality:  # once per load, before the points: every point's peaks are reset and measured from there
        emit("phase", index=0, phase="quality")
        base = replace(base, **quality_phase(first, source, model, output_dir))
    measure_points(points, model, tracker, emit, base)


def measure_points(points: list[RunConfig], model, tracker, emit: Emit, base: Measurement) -> None:
    """Each shape point with its own warmup and repeats; after an out-of-memory point, the points it bounds are
    skipped (see `settings.dominates`)."""
    from .settings import skip_reason

    failed: list[RunConfig] = []
    for index, point in enumerate(points):
        reason = skip_reason(point, failed)
        if reason is not None:
            emit("point", index=index, status="skipped", measurement=base, error=reason)
            continue
        release_memory(point.device)  # each point's peaks start from what the model itself holds
        try:
            speed = speed_phase(point, model, tracker, lambda phase, i=index: emit("phase", index=i, phase=phase))
        except Exception as exc:  # noqa: BLE001 - one point's failure is its row; the others run on
            status, error = failure_status(exc), describe(exc)
        else:
            emit("point", index=index, status="ok", error=None, measurement=replace(base, speed=speed))
            continue
        if status == "oom":
            failed.append(point)
        release_memory(point.device)  # out of the except block: the exception's frames (and tensors) are gone
        emit("point", index=index, status=status, error=error, measurement=base)


def release_memory(device: str) -> None:
    """Give back what the last phase left (a failed point's frames are gone with its exception): collected, and on
    CUDA the allocator's cached blocks returned, so NVML's device use starts from the model's own bytes."""
    import gc

    gc.collect()
    if device == "cuda":
        import torch

        torch.cuda.empty_cache()


def measure_bandwidth(device: str) -> dict[str, Any]:
    """The device's copy bandwidth, or why it could not be measured (a bound is then not shown)."""
    from .bandwidth import measure_copy_bandwidth

    try:
        return measure_copy_bandwidth(device)
    except Exception as exc:  # noqa: BLE001 - the bound is an addition; its failure must not void the run
        return {"bytes_per_second": None, "device": device, "method": f"not measured: {describe(exc)}"}


def tracker_summary(tracker) -> dict[str, Any]:
    summary = dict(tracker.summary())
    summary.pop("phases", None)
    return summary


def quality_phase(config: RunConfig, source, model, output_dir: Path | None) -> dict[str, Any]:
    """Perplexity, KL and top-1 agreement against the reference on the loaded model: {"quality": result}, or
    {"quality_skipped": reason} when it fails (no tokenizer, a failed reference); the speed and memory stand."""
    from ..quality import measure_quality

    try:
        if output_dir is None:
            raise RunError("no output folder to keep the reference's log-probabilities in")
        from transformers import AutoTokenizer

        try:
            tokenizer = AutoTokenizer.from_pretrained(str(source.folder), trust_remote_code=config.trust_remote_code)
        except (OSError, ValueError) as exc:
            raise RunError(f"no tokenizer could be loaded from {source.folder} ({describe(exc)[:200]}); quality "
                           "is scored on text, so the folder needs its tokenizer files") from None
        from .config import weights_fingerprint

        return {"quality": measure_quality(model, tokenizer, config.quality_spec(), output_dir,
                                           is_reference=config.dtype == config.reference,
                                           model_id=str(Path(source.folder).resolve()),
                                           weights=weights_fingerprint(source.folder, config.allow_pickle))}
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as exc:  # noqa: BLE001 - quality is an addition: its failure must not void the row
        return {"quality_skipped": describe(exc)}


class LoadFailed(Exception):
    """Loading failed: the cause, and what was measured before it (None when the load itself failed)."""

    def __init__(self, cause: BaseException, load: LoadMeasurement | None = None):
        super().__init__(str(cause))
        self.cause, self.load = cause, load


def load_phase(config: RunConfig, source, tracker, emit: Emit):
    """Load the model, measure its weights, and refuse a quantized label on an unquantized model."""
    from . import footprint, loading
    from .trackers import timed

    emit("phase", index=0, phase="load")
    tracker.begin("load")
    try:
        loaded, seconds = timed(lambda: loading.load_model(config, source, tracker.synchronize),
                                tracker.synchronize)
    except Exception as exc:  # noqa: BLE001 - every point of this load gets the failure as its status
        raise LoadFailed(exc) from None
    finally:
        tracker.end("load")
    from .devicemap import measured_placement, remove_if_empty

    remove_if_empty(config.offload_folder)
    placement = measured_placement(loaded.model, config.device_map) if config.device_map else None
    quantized, linear = loading.count_quantized(loaded.model)
    census = loading.parameter_census(loaded.model)
    blocks = [list(block) for block in census.float_blocks] if config.scheme.quantized else []
    load = LoadMeasurement(seconds=seconds, steps=loaded.seconds, weights_bytes=footprint.weights_bytes(loaded.model),
                           quantized_layers=quantized, linear_layers=linear, quantized_params=census.quantized_params,
                           params=census.params, unquantized_blocks=blocks, quantized_by=loaded.quantized_by,
                           phase=tracker.phases["load"], peak_bytes=tracker.peak_bytes(("load",)),
                           placement=placement and placement.as_dict())
    try:
        check_quantized(config, quantized, linear)
        check_quantized_share(config, census, planned_quantized_params(config, source))
    except RunError as exc:
        raise LoadFailed(exc, load) from None
    return loaded.model, load


def check_quantized(config: RunConfig, quantized: int, linear: int) -> None:
    """A row labelled int8 or nf4 must hold quantized layers, all of them."""
    if config.scheme.quantized and (linear == 0 or quantized < linear):
        raise RunError(f"{config.dtype} was asked for but only {quantized} of {linear} linear layers hold "
                       "bitsandbytes-quantized weights, so this row would measure a float model. Check the "
                       "bitsandbytes install (python -m bitsandbytes) and the model's layer types")


def planned_quantized_params(config: RunConfig, source) -> int:
    from ..planner import quantized_params

    return quantized_params(source.spec(), config.scheme)


def check_quantized_share(config: RunConfig, census, planned: int) -> None:
    """A quantized row must hold at least the parameters the plan says bitsandbytes quantizes; less means a
    block was left 16-bit that the plan did not expect, and the row would measure something else."""
    if not config.scheme.quantized or census.quantized_params >= planned * 0.99:
        return
    blocks = ", ".join(f"{name} ({n / census.params:.0%})" for name, n in census.float_blocks[:4]) or "none named"
    raise RunError(f"{config.dtype} was asked for but bitsandbytes holds {census.quantized_share:.0%} of the "
                   f"parameters, against {planned / census.params:.0%} planned; 16-bit blocks: {blocks}. The row "
                   "would not measure the planned configuration. Check the model's layer types")


SPEED_PHASES = ("prefill", "decode")


def speed_phase(config: RunConfig, model, tracker, on_phase: Callable[[str], None]) -> SpeedMeasurement:
    """One shape point: warmup runs, then `repeats` timed runs with peaks reset at each phase; the KV cache is
    measured from the last run's cache object."""
    from . import footprint
    from .decode import generate_fixed, prompt_ids

    tracker.forget(SPEED_PHASES)
    ids = prompt_ids(model.config.vocab_size, config.batch, config.prompt_tokens, config.seed, config.device)
    for number in range(config.warmup):
        on_phase(f"warmup {number + 1}/{config.warmup}")
        generate_fixed(model, ids, config.new_tokens, tracker, track=False)
    runs = []
    for number in range(config.repeats):
        on_phase(f"prefill+decode {number + 1}/{config.repeats}")
        if runs:
            # NOTE: only the last run's cache is measured; an earlier one kept alive would sit in memory during
            # this run and add a whole KV cache per repeat to its prefill and decode peaks.
            runs[-1].cache = None
        runs.append(generate_fixed(model, ids, config.new_tokens, tracker))
    last = runs[-1]
    kv_bytes, kv_tokens = footprint.kv_cache_bytes(last.cache), footprint.cached_tokens(last.cache)
    summary = speed_summary(runs, config.batch)
    return SpeedMeasurement(
        ttft_seconds=summary["ttft_seconds"], decode_token_seconds=summary.get("decode_token_seconds"),
        decode_tokens_per_second=summary.get("decode_tokens_per_second"),
        generate_seconds=summary.get("generate_seconds"), kv_cache_bytes=kv_bytes, kv_cache_tokens=kv_tokens,
        # the cache holds the same bytes per token throughout (no sliding window shorter than the run: see plan)
        prompt_kv_cache_bytes=kv_bytes * min(config.prompt_tokens, kv_tokens) // max(kv_tokens, 1),
        weights_bytes_after_run=footprint.weights_bytes(model),
        phases={name: dict(tracker.phases[name]) for name in SPEED_PHASES if name in tracker.phases},
        peak_bytes=tracker.peak_bytes(SPEED_PHASES))


def speed_summary(runs, batch: int) -> dict[str, Any]:
    """Median, p90 and CV of TTFT, of each decode step, and of decode throughput per run."""
    summary: dict[str, Any] = {"ttft_seconds": summarize([r.ttft_seconds for r in runs])}
    steps = [s for r in runs for s in r.step_seconds]
    if steps:
        summary["decode_token_seconds"] = summarize(steps)
        summary["decode_tokens_per_second"] = summarize(
            [batch * len(r.step_seconds) / sum(r.step_seconds) for r in runs])
        summary["generate_seconds"] = statistics.median(r.ttft_seconds + sum(r.step_seconds) for r in runs)
    return summary
