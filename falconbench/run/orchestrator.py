"""The sweep: one spawned process per configuration, each row appended to results.jsonl as it finishes.

The parent never imports the measuring libraries beyond resolving `--device auto`; it plans each
configuration (so even an out-of-memory row carries the plan), starts the worker, relays its progress, and
turns whatever comes back (a result, a crash, a signal) into a row.
"""

from __future__ import annotations

import multiprocessing
import signal
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Sequence

from ..errors import RunError, UsageError
from ..planner import plan_point
from ..results import RESULTS_FILE, RunResult, append_result
from ..sources import resolve_model
from . import worker
from .config import RUN_DEVICES, RunConfig, config_hash, default_output_dir, kv_dtype_for, model_identity, \
    require_weights

WORKER_LOG = "worker.log"


@dataclass(frozen=True)
class Event:
    """Progress of a sweep: a configuration starts, reaches a phase, or finishes with its row."""

    kind: str  # "start" | "phase" | "done"
    index: int
    total: int
    config: RunConfig
    phase: str | None = None
    row: RunResult | None = None


OnEvent = Callable[[Event], None]


@dataclass(frozen=True)
class RunOutcome:
    """Every row of a sweep, and where they were written."""

    rows: list[RunResult]
    output_dir: Path

    @property
    def results_path(self) -> Path:
        return self.output_dir / RESULTS_FILE


def resolve_device(device: str) -> str:
    """`auto` → cuda when torch sees a GPU, else cpu; `cuda` without one is refused up front."""
    if device not in RUN_DEVICES:
        raise UsageError(f"unknown device {device!r}. Choose from: {', '.join(RUN_DEVICES)}")
    if device == "cpu":
        return device
    import torch

    available = torch.cuda.is_available()
    if device == "cuda" and not available:
        raise UsageError(f"--device cuda, but torch {torch.__version__} sees no CUDA GPU. Use --device cpu, "
                         "or install a CUDA build of torch")
    return "cuda" if available else "cpu"


def run_benchmark(model: str, dtypes: Sequence[str], device: str = "auto", output: Path | None = None,
                  on_event: OnEvent | None = None, **settings: Any) -> RunOutcome:
    """Measure `model` in each of `dtypes`, one fresh process per configuration (the Python API of `run`)."""
    if not dtypes:
        raise UsageError("no dtype to run. Example: --dtype bf16,int8,nf4")
    source = resolve_model(model)
    require_weights(source, settings.get("random_weights", False))
    resolved = resolve_device(device)
    configs = [RunConfig(model=model, dtype=d, device=resolved, **settings) for d in dtypes]
    output_dir = Path(output) if output is not None else default_output_dir(source.name)
    return RunOutcome(run_sweep(configs, output_dir, on_event), output_dir)


def run_sweep(configs: Sequence[RunConfig], output_dir: Path, on_event: OnEvent | None = None) -> list[RunResult]:
    """Run each configuration in its own process, appending each row to results.jsonl as it finishes."""
    notify = on_event or (lambda event: None)
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise RunError(f"cannot create {output_dir}: {exc.strerror or exc}. Choose another --output") from None
    rows = []
    for index, config in enumerate(configs):
        notify(Event("start", index, len(configs), config))
        base = planned_row(config)
        row = run_isolated(config, base, output_dir,
                           lambda phase, i=index, c=config: notify(Event("phase", i, len(configs), c, phase)))
        append_result(output_dir / RESULTS_FILE, row)
        rows.append(row)
        notify(Event("done", index, len(configs), config, row=row))
    return rows


def planned_row(config: RunConfig) -> RunResult:
    """The row before measurement: identity, settings, hash, and the planner's figures for this run."""
    source = resolve_model(config.model)
    identity = model_identity(source, config.random_weights)
    plan = plan_point(source.spec(), config.scheme, context=config.cached_tokens, batch=config.batch,
                      kv_dtype=kv_dtype_for(config.scheme), device=config.device)
    return RunResult(model=source.name, dtype=config.dtype, status="error", config_hash=config_hash(identity, config),
                     device=config.device, settings={**config.settings(), "model_source": identity},
                     planned_weights_bytes=plan.weights_bytes, planned_kv_cache_bytes=plan.kv_cache_bytes,
                     planned_total_bytes=plan.total_bytes)


def run_isolated(config: RunConfig, base: RunResult, output_dir: Path, on_phase: Callable[[str], None]) -> RunResult:
    """Spawn the worker for `config`, relay its phases, and build the row from its answer or its death."""
    context = multiprocessing.get_context("spawn")
    receiver, sender = context.Pipe(duplex=False)
    log_path = output_dir / WORKER_LOG
    with open(log_path, "a", encoding="utf-8") as log:
        log.write(f"\n=== {base.model} {config.dtype} {base.config_hash} {_now()} ===\n")
    process = context.Process(target=worker.child_main, args=(config.as_dict(), sender, str(log_path)),
                              name=f"falconbench-{config.dtype}")
    process.start()
    sender.close()  # the child holds the only writer now: its exit ends our reads
    result = None
    try:
        while True:
            try:
                message = receiver.recv()
            except EOFError:
                break
            if message["kind"] == "phase":
                on_phase(message["phase"])
            elif message["kind"] == "result":
                result = message
        process.join()
    except KeyboardInterrupt:
        process.kill()
        process.join()
        append_result(output_dir / RESULTS_FILE, finish(base, "interrupted", "interrupted by the user", {}))
        raise
    finally:
        receiver.close()
    if result is None:
        return finish(base, "error", death_message(process.exitcode, log_path), {})
    return finish(base, result["status"], result["error"], result["fields"])


def death_message(exitcode: int | None, log_path: Path) -> str:
    """Why a worker ended without a result: a signal (exit code < 0) or an exit status."""
    if exitcode is not None and exitcode < 0:
        try:
            name = signal.Signals(-exitcode).name
        except ValueError:
            name = f"signal {-exitcode}"
        hint = " (on Linux, usually the out-of-memory killer)" if -exitcode == signal.SIGKILL else ""
        return f"the worker process was killed by {name}{hint}. See {log_path}"
    return f"the worker process exited with code {exitcode} without a result. See {log_path}"


def finish(base: RunResult, status: str, error: str | None, fields: dict[str, Any]) -> RunResult:
    """The planned row completed with what the worker measured."""
    return replace(base, status=status, error=error, timestamp=_now(), **fields)


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")
