"""The sweep: one spawned process per configuration, each row appended to results.jsonl as it finishes.

The parent never imports the measuring libraries beyond resolving `--device auto`; it plans each
configuration (so even an out-of-memory row carries the plan), starts the worker, relays its progress, and
turns whatever comes back (a result, a crash, a signal) into a row.
"""

from __future__ import annotations

import multiprocessing
import signal
import threading
from contextlib import contextmanager
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Sequence

from ..errors import RunError, UsageError
from ..planner import plan_point
from ..results import RESULTS_FILE, RunResult, append_result, read_results
from ..schemes import get_scheme
from ..sources import ModelSource, profiles_dir, resolve_model
from . import worker
from .rundir import hold_run_folder, keep_model_config, prepare_output, reference_unusable, resume_rows
from .config import RUN_DEVICES, RunConfig, config_hash, default_output_dir, kv_dtype_for, model_identity, \
    require_weights
from .hub import resolve_or_download

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
    resumed: bool = False  # "done" for a row found in the results file by --resume
    output_dir: Path | None = None


OnEvent = Callable[[Event], None]


@dataclass(frozen=True)
class RunOutcome:
    """Every row of a sweep, and where they were written."""

    rows: list[RunResult]
    output_dir: Path
    quality_skipped: str | None = None  # why quality was not measured, when it was not
    problems: tuple[str, ...] = ()  # lines of results.jsonl that are not rows ("path:line: reason"), skipped
    report: Any = None  # the ReportResult, when the report was asked for and written
    report_error: str | None = None  # why the asked-for report could not be written (the results stand)

    @property
    def results_path(self) -> Path:
        return self.output_dir / RESULTS_FILE

    @property
    def failed(self) -> bool:
        """Some configuration ended out of memory or in an error (the exit code says so)."""
        return any(row.status in ("oom", "error") for row in self.rows)


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
                  on_event: OnEvent | None = None, quality: bool = True, resume: bool = False,
                  report: bool = False, **settings: Any) -> RunOutcome:
    """Measure `model` in each of `dtypes`, one fresh process per configuration (the Python API of `run`).

    Quality is measured when the model has real weights and `quality` is on; then the reference scheme runs
    first (added when missing), so its log-probabilities are stored before any scheme is compared with them.
    With `report`, the report is written before the output folder's lock is released.
    """
    if output is not None and not str(output).strip():
        raise UsageError("--output is empty. Name a folder, or leave the option out for a new one under reports/")
    if not dtypes:
        raise UsageError("no dtype to run. Example: --dtype bf16,int8,nf4")
    # NOTE: canonical names, so BF16 and bf16 are one configuration and the reference is found among the dtypes
    dtypes = [get_scheme(d).name for d in dtypes]
    settings["reference"] = get_scheme(settings.get("reference", "bf16")).name
    if len(set(dtypes)) != len(dtypes):
        raise UsageError(f"a dtype is listed twice in {', '.join(dtypes)}; each runs once")
    check_model_text(model)
    model = zoo_folder(model)
    random_weights = settings.get("random_weights", False)
    source = resolve_or_download(model, settings.get("allow_downloads", False), random_weights,
                                 settings.get("allow_pickle", False), settings.get("trust_remote_code", False))
    require_weights(source, random_weights, settings.get("allow_pickle", False))
    resolved = resolve_device(device)
    skipped = None if quality and not random_weights else (
        "random weights: quality needs trained weights" if quality else "--no-quality")
    if skipped is None:
        reference = settings.get("reference", "bf16")
        dtypes = [reference] + [d for d in dtypes if d != reference]
    configs = [RunConfig(model=model, dtype=d, device=resolved, quality=skipped is None, **settings) for d in dtypes]
    check_up_front(configs, source)
    output_dir = Path(output) if output is not None else default_output_dir(source.name)
    with terminate_as_interrupt(), hold_run_folder(output_dir):
        rows = run_sweep(configs, output_dir, on_event, resume=resume, quality_skipped=skipped)
        _, problems = read_results(output_dir / RESULTS_FILE)
        outcome = RunOutcome(rows, output_dir, quality_skipped=skipped, problems=tuple(str(p) for p in problems))
        return replace(outcome, **write_run_report(output_dir)) if report else outcome


def write_run_report(output_dir: Path) -> dict[str, Any]:
    """The run's report, into its folder: {"report": result} or, when it fails, {"report_error": why}."""
    from ..report import write_report

    try:
        return {"report": write_report([output_dir])}
    except Exception as error:  # noqa: BLE001 - the sweep succeeded; a report failure must not hide that
        return {"report_error": str(error) or type(error).__name__}


def check_model_text(model: str) -> None:
    """A model path every file and log can name: bytes that are not UTF-8 (a folder named with \\xff) cannot be
    written into results.jsonl or worker.log, so they are refused before the output folder exists."""
    try:
        model.encode("utf-8")
    except UnicodeEncodeError:
        raise UsageError(f"the model path {model.encode('utf-8', 'backslashreplace').decode()} holds bytes that "
                         "are not UTF-8. Rename the folder, or link it under a UTF-8 name") from None


def check_up_front(configs: Sequence[RunConfig], source: ModelSource) -> None:
    """What each worker would fail on, refused once before any starts: token counts past the model's positions,
    an evaluation text that is not UTF-8 prose, a reference too large to store."""
    from ..quality.reference import check_reference_size
    from ..quality.spec import check_eval_text
    from .config import check_against_model

    spec = source.spec()
    for config in configs[:1]:  # every configuration of a sweep shares these settings
        check_against_model(config, spec)
        if config.quality:
            quality = config.quality_spec()
            check_eval_text(quality)
            check_reference_size(quality.eval_tokens - 1, spec.vocab_size, quality.logprob_dtype)


def zoo_folder(model: str) -> str:
    """A bundled real model's name (e.g. smollm2) becomes its cached folder, converted on first use."""
    from .. import zoo

    if model.strip().lower() not in zoo.ZOO or (profiles_dir() / "models" / model.strip().lower()).is_dir():
        return model
    return str(zoo.ensure_model(model).folder)


def run_sweep(configs: Sequence[RunConfig], output_dir: Path, on_event: OnEvent | None = None,
              resume: bool = False, quality_skipped: str | None = None) -> list[RunResult]:
    """Run each configuration in its own process, appending each row to results.jsonl as it finishes.

    With `resume`, configurations whose final row is in the file already are not run again (an interrupted one
    is); without it, a folder that holds results is refused rather than mixed into.
    """
    def notify(event: Event) -> None:
        if on_event is not None:
            on_event(replace(event, output_dir=Path(output_dir)))

    sources = {model: resolve_model(model) for model in dict.fromkeys(c.model for c in configs)}
    planned = [planned_row(config, quality_skipped, sources[config.model]) for config in configs]
    with terminate_as_interrupt(), hold_run_folder(output_dir):
        results_path = prepare_output(output_dir)
        done = resume_rows(results_path, planned, resume, lambda row: bool(reference_unusable(row, output_dir)))
        if sources:
            keep_model_config(next(iter(sources.values())), output_dir)
        rows = []
        for index, (config, base) in enumerate(zip(configs, planned)):
            notify(Event("start", index, len(configs), config))
            if base.config_hash in done:
                row = done[base.config_hash]
                notify(Event("done", index, len(configs), config, row=row, resumed=True))
                rows.append(row)
                continue
            row = run_isolated(config, base, output_dir,
                               lambda phase, i=index, c=config: notify(Event("phase", i, len(configs), c, phase)))
            append_result(results_path, row)
            rows.append(row)
            notify(Event("done", index, len(configs), config, row=row))
        return rows


@contextmanager
def terminate_as_interrupt():
    """SIGTERM (and SIGHUP) raise KeyboardInterrupt, as Ctrl-C does, so every way of stopping a sweep ends the
    worker and records the configuration in flight as interrupted. Only in the main thread."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum, frame):
        raise KeyboardInterrupt(signal.Signals(signum).name)

    previous = {sig: signal.signal(sig, interrupt) for sig in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def planned_row(config: RunConfig, quality_skipped: str | None = None,
                source: ModelSource | None = None) -> RunResult:
    """The row before measurement: identity, settings, hash, and the planner's figures for this run."""
    from .. import __version__  # here: the package's __init__ imports this module before it sets its version

    source = source or resolve_model(config.model)
    identity = model_identity(source, config.random_weights, config.allow_pickle)
    plan = plan_point(source.spec(), config.scheme, context=config.cached_tokens, batch=config.batch,
                      kv_dtype=kv_dtype_for(config.scheme), attn_impl=config.attn_impl, device=config.device)
    return RunResult(model=source.name, dtype=config.dtype, status="error", config_hash=config_hash(identity, config),
                     device=config.device, settings={**config.settings(), "model_source": identity},
                     planned_weights_bytes=plan.weights_bytes, planned_kv_cache_bytes=plan.kv_cache_bytes,
                     planned_total_bytes=plan.total_bytes, falconbench_version=__version__,
                     quality={"skipped": f"quality not measured: {quality_skipped}"} if quality_skipped else {})


# NOTE: blocked while the worker starts, so it inherits the block: Ctrl-C (sent to the whole process group), SIGTERM
# and SIGHUP then reach only the parent, which kills the worker and records its row as interrupted. A worker hit
# while its interpreter starts would print a traceback, or die first and leave an "error" row that --resume keeps.
STOP_SIGNALS = frozenset({signal.SIGINT, signal.SIGTERM, signal.SIGHUP})


@contextmanager
def signals_blocked(signals: frozenset):
    """Block `signals` in this thread, and hold back their Python handlers, while the block runs; a process
    started meanwhile keeps the mask for its whole life. A signal that came meanwhile raises KeyboardInterrupt
    once the block is done.

    NOTE: the mask alone is not enough. It is per thread, and the sweep has others (the progress display's
    refresh thread): the kernel hands a process-directed signal to a thread that does not block it, and Python
    then runs the handler in the main thread at its next instruction, inside `Process.start()`. Raised between
    spawning the child and sending it its pickled arguments, that left a child whose pid the parent never
    learnt: it printed a traceback from multiprocessing/spawn.py on the terminal and was never killed.
    """
    if not hasattr(signal, "pthread_sigmask"):  # not POSIX
        yield
        return
    arrived: list[int] = []
    held = {}
    if threading.current_thread() is threading.main_thread():
        held = {sig: signal.signal(sig, lambda signum, frame: arrived.append(signum)) for sig in signals}
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, signals)
    try:
        yield
    finally:
        # still masked: take the signals pending for this thread, so none reaches a restored handler half-way
        for sig in signal.sigpending() & set(signals):
            signal.sigtimedwait([sig], 0)
            arrived.append(sig)
        try:
            for sig, handler in held.items():
                signal.signal(sig, handler)
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, previous)
    arrived = [sig for sig in arrived if held.get(sig) is not signal.SIG_IGN]
    if arrived:
        raise KeyboardInterrupt(*([] if arrived[0] == signal.SIGINT else [signal.Signals(arrived[0]).name]))


def run_isolated(config: RunConfig, base: RunResult, output_dir: Path, on_phase: Callable[[str], None]) -> RunResult:
    """Spawn the worker for `config`, relay its phases, and build the row from its answer or its death."""
    context = multiprocessing.get_context("spawn")
    receiver, sender = context.Pipe(duplex=False)
    log_path = output_dir / WORKER_LOG
    try:
        with open(log_path, "a", encoding="utf-8") as log:
            log.write(f"\n=== {base.model} {config.dtype} {base.config_hash} {_now()} ===\n")
    except OSError as exc:
        raise RunError(f"cannot write {log_path}: {exc.strerror or exc}. Free some space or choose another "
                       "--output folder") from None
    process = context.Process(target=worker.child_main, args=(config.as_dict(), sender, str(log_path),
                                                              str(output_dir)),
                              name=f"falconbench-{config.dtype}")
    result = None
    try:
        with signals_blocked(STOP_SIGNALS):
            process.start()
        sender.close()  # the child holds the only writer now: its exit ends our reads
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
    except KeyboardInterrupt as stop:
        if process.pid is not None:
            process.kill()
            process.join()
        how = f"by {stop.args[0]}" if stop.args else "by the user (Ctrl-C)"
        append_result(output_dir / RESULTS_FILE, finish(base, "interrupted", f"interrupted {how}", {}))
        raise
    finally:
        if process.is_alive():  # any other way out of this function: never leave the worker running
            process.kill()
            process.join()
        sender.close()
        receiver.close()
    if result is None:
        return finish(base, death_status(process.exitcode, config.memory_cap_bytes),
                      death_message(process.exitcode, log_path, config.memory_cap_bytes), {})
    return finish(base, result["status"], result["error"], result["fields"])


# NOTE: under RLIMIT_AS, native code that does not check its allocations crashes at the cap instead of raising
# (seen: a segfault in the first CPU forward of a tiny Falcon); a capped worker dying of these ran out of memory.
CAP_CRASH_SIGNALS = (signal.SIGSEGV, signal.SIGBUS, signal.SIGABRT)


def death_status(exitcode: int | None, memory_cap_bytes: int | None = None) -> str:
    """oom for a capped worker that crashed as allocators do at the cap, error for any other death."""
    crashed = exitcode is not None and exitcode < 0 and -exitcode in CAP_CRASH_SIGNALS
    return "oom" if memory_cap_bytes and crashed else "error"


def death_message(exitcode: int | None, log_path: Path, memory_cap_bytes: int | None = None) -> str:
    """Why a worker ended without a result: a signal (exit code < 0) or an exit status."""
    if exitcode is not None and exitcode < 0:
        try:
            name = signal.Signals(-exitcode).name
        except ValueError:
            name = f"signal {-exitcode}"
        hint = " (on Linux, usually the out-of-memory killer)" if -exitcode == signal.SIGKILL else ""
        if death_status(exitcode, memory_cap_bytes) == "oom":
            hint = (f" at its --memory-cap of {memory_cap_bytes:,} bytes (a library crashed there instead of "
                    "failing cleanly)")
        return f"the worker process was killed by {name}{hint}. See {log_path}"
    return f"the worker process exited with code {exitcode} without a result. See {log_path}"


def finish(base: RunResult, status: str, error: str | None, fields: dict[str, Any]) -> RunResult:
    """The planned row completed with what the worker measured."""
    return replace(base, status=status, error=error, timestamp=_now(), **fields)


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")
