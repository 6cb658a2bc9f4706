"""The spawned process that measures one configuration, and reports through a pipe.

Messages to the parent: {"kind": "phase", "phase": ...} as work advances, then exactly one
{"kind": "result", "status": ..., "error": ..., "fields": {...}}. `fields` holds what was measured before any
failure, so an out-of-memory row still says what loading cost.
"""

from __future__ import annotations

import faulthandler
import multiprocessing
import os
import signal
import statistics
import sys
from pathlib import Path
from typing import Any, Callable

from ..errors import FalconbenchError, RunError
from ..sources import resolve_model
from .config import RunConfig
from .stats import summarize

Emit = Callable[..., None]
# NOTE: "alloc_failed": cuBLAS's CUBLAS_STATUS_ALLOC_FAILED, how a GPU out of memory shows when a handle or
# workspace cannot be allocated (a RuntimeError, not torch.cuda.OutOfMemoryError)
OOM_MESSAGES = ("out of memory", "can't allocate memory", "not enough memory", "failed to allocate", "alloc_failed")


def child_main(config: dict[str, Any], conn, log_path: str | None = None, output_dir: str | None = None) -> None:
    """Entry point of the spawned process (a module-level function, as the spawn context needs)."""
    end_with_parent()
    if log_path:
        redirect_output(log_path)
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    if not config.get("allow_downloads"):  # never reach the hub unless the user allowed it
        os.environ.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    fields: dict[str, Any] = {}

    def emit(kind: str, **data: Any) -> None:
        conn.send({"kind": kind, **data})

    try:
        measure(RunConfig(**config), emit, fields, Path(output_dir) if output_dir else None)
        emit("result", status="ok", error=None, fields=fields)
    except BaseException as exc:  # noqa: BLE001 - every failure becomes the row's status, the sweep goes on
        status = "oom" if is_oom(exc) else ("interrupted" if isinstance(exc, KeyboardInterrupt) else "error")
        emit("result", status=status, error=describe(exc), fields=fields)
    finally:
        conn.close()
        sys.stdout.flush()
        sys.stderr.flush()
        # NOTE: the row is sent; skip the interpreter's teardown of torch and transformers (about 2.5 s of
        # module finalization per configuration, measured with benchmarks/run_overhead.py).
        os._exit(0)


def end_with_parent() -> None:
    """Ask Linux to SIGKILL this process when its parent dies, so a killed sweep leaves no worker behind."""
    if not sys.platform.startswith("linux"):
        return
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # no prctl: the parent still kills its worker on every way out it sees
        pass
    parent = multiprocessing.parent_process()
    # the parent died before the request took effect (NOTE: the orphan's new parent is a subreaper, not always 1)
    if os.getppid() == 1 or (parent is not None and os.getppid() != parent.pid):
        os._exit(1)


def cap_memory(extra_bytes: int) -> None:
    """Let this process's address space grow by at most `extra_bytes` from now on (RLIMIT_AS): allocations past
    it fail as they would on a smaller machine, and the row reads oom."""
    import resource

    with open("/proc/self/statm", encoding="ascii") as statm:
        current = int(statm.read().split()[0]) * resource.getpagesize()
    resource.setrlimit(resource.RLIMIT_AS, (current + extra_bytes, resource.getrlimit(resource.RLIMIT_AS)[1]))


def redirect_output(path: str) -> None:
    """Send this process's stdout and stderr (library warnings, progress bars, crash dumps) to the log."""
    log = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    sys.stdout.flush()
    sys.stderr.flush()
    os.dup2(log, 1)
    os.dup2(log, 2)
    os.close(log)
    faulthandler.enable()  # a crash in native code (a segfault at a --memory-cap) leaves its Python stack here


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


def measure(config: RunConfig, emit: Emit, fields: dict[str, Any], output_dir: Path | None = None) -> None:
    """Load, guard, prefill + decode with warmup and repeats, measure, then score quality; fill `fields` as each
    part finishes."""
    from . import environment, loading, trackers

    source = resolve_model(config.model)
    emit("phase", phase="setup")
    tracker = trackers.make_tracker(config.device)
    tracker.read_baseline()
    import torch

    torch.manual_seed(config.seed)
    loading.import_libraries(config, source)
    quiet_libraries()
    if config.memory_cap_bytes:
        cap_memory(config.memory_cap_bytes)
    tracker.start()
    fields["environment"] = environment.environment(config.device, getattr(tracker, "nvml", None))
    model = load_phase(config, source, tracker, emit, fields)
    speed_phase(config, model, tracker, emit, fields)
    fields["memory"] = {**fields.get("memory", {}), **tracker.summary()}
    fields["peak_memory_bytes"] = tracker.peak_bytes()
    if config.quality:  # after the speed phases, so it never disturbs their timings or peaks
        emit("phase", phase="quality")
        quality_phase(config, source, model, output_dir, fields)


def quality_phase(config: RunConfig, source, model, output_dir: Path | None, fields: dict[str, Any]) -> None:
    """Perplexity, KL and top-1 agreement against the reference on the same loaded model. A failure here (no
    tokenizer, a failed reference) skips quality with its reason; the speed and memory figures stand."""
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

        result = measure_quality(model, tokenizer, config.quality_spec(), output_dir,
                                 is_reference=config.dtype == config.reference,
                                 model_id=str(Path(source.folder).resolve()),
                                 weights=weights_fingerprint(source.folder, config.allow_pickle))
        fields.update(result.as_fields())
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as exc:  # noqa: BLE001 - quality is an addition: its failure must not void the row
        fields["quality"] = {"skipped": f"quality not measured: {describe(exc)}"}


def load_phase(config: RunConfig, source, tracker, emit: Emit, fields: dict[str, Any]):
    """Load the model, measure its weights, and refuse a quantized label on an unquantized model."""
    from . import footprint, loading
    from .trackers import timed

    emit("phase", phase="load")
    tracker.begin("load")
    loaded, seconds = timed(lambda: loading.load_model(config, source, tracker.synchronize), tracker.synchronize)
    tracker.end("load")
    quantized, linear = loading.count_quantized(loaded.model)
    census = loading.parameter_census(loaded.model)
    fields.update(load_seconds=seconds, quantized_layers=quantized, linear_layers=linear,
                  quantized_params=census.quantized_params, params=census.params,
                  weights_bytes=footprint.weights_bytes(loaded.model))
    fields["latency"] = {"load_seconds": {**loaded.seconds, "total": seconds}}
    fields["memory"] = {"quantized_by": loaded.quantized_by, "phases": dict(tracker.phases)}
    fields["peak_memory_bytes"] = tracker.peak_bytes()
    if config.scheme.quantized and census.float_blocks:
        fields["memory"]["unquantized_blocks"] = [list(block) for block in census.float_blocks]
    check_quantized(config, quantized, linear)
    check_quantized_share(config, census, planned_quantized_params(config, source))
    return loaded.model


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


def speed_phase(config: RunConfig, model, tracker, emit: Emit, fields: dict[str, Any]) -> None:
    """Warmup runs, then `repeats` timed runs; the KV cache is measured from the last run's cache object."""
    from . import footprint
    from .decode import generate_fixed, prompt_ids

    ids = prompt_ids(model.config.vocab_size, config.batch, config.prompt_tokens, config.seed, config.device)
    for number in range(config.warmup):
        emit("phase", phase=f"warmup {number + 1}/{config.warmup}")
        generate_fixed(model, ids, config.new_tokens, tracker, track=False)
    runs = []
    for number in range(config.repeats):
        emit("phase", phase=f"prefill+decode {number + 1}/{config.repeats}")
        if runs:
            # NOTE: only the last run's cache is measured; an earlier one kept alive would sit in memory during
            # this run and add a whole KV cache per repeat to its prefill and decode peaks.
            runs[-1].cache = None
        runs.append(generate_fixed(model, ids, config.new_tokens, tracker))
    last = runs[-1]
    fields["kv_cache_bytes"] = footprint.kv_cache_bytes(last.cache)
    fields["memory"]["kv_cache_tokens"] = footprint.cached_tokens(last.cache)
    fields["memory"]["weights_bytes_after_run"] = footprint.weights_bytes(model)
    fields["latency"].update(speed_summary(runs, config.batch))
    fields["ttft_seconds"] = fields["latency"]["ttft_seconds"]["median"]
    rates = fields["latency"].get("decode_tokens_per_second")
    fields["decode_tokens_per_second"] = rates["median"] if rates else None


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
