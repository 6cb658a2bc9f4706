"""The sweep: one spawned process per load (scheme × attention kernel), its shape points inside it, each point's
row appended to results.jsonl as it finishes.

The parent never imports the measuring libraries beyond resolving `--device auto`; it plans each point (so even
an out-of-memory row carries the plan), starts the worker, relays its progress, and turns whatever comes back (a
result, a crash, a signal) into a row.
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
from ..results import RESULTS_FILE, RunResult, append_result, read_results
from ..schemes import get_scheme
from ..sources import ModelSource, profiles_dir, resolve_model
from . import worker
from .rundir import hold_run_folder, keep_model_config, prepare_output, reference_unusable, resume_rows
from .config import RUN_DEVICES, RunConfig, config_hash, default_output_dir, kv_dtype_for, machine_memory_bytes, \
    model_identity, require_weights
from .devicemap import check_placement, planned_placement
from .hub import resolve_or_download
from .measurement import build_row
from .settings import RunSettings, group_loads, skip_reason
from .signals import STOP_SIGNALS, signals_blocked, terminate_as_interrupt  # noqa: F401 - re-exported

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
    reference_choice: str | None = None  # which quality reference was chosen, and why

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


def run_benchmark(settings: RunSettings, on_event: OnEvent | None = None, report: bool = False) -> RunOutcome:
    """Measure `settings.model` at every point of the matrix, one fresh process per load configuration (scheme ×
    attention kernel), its shape points inside it (the Python API of `run`).

    Quality is measured when the model has real weights and `settings.quality` is on; then the reference scheme
    runs first (added when missing), so its log-probabilities are stored before any scheme is compared with them.
    With `report`, the report is written before the output folder's lock is released.
    """
    if settings.output is not None and not str(settings.output).strip():
        raise UsageError("--output is empty. Name a folder, or leave the option out for a new one under reports/")
    check_model_text(settings.model)
    model = zoo_folder(settings.model)
    source = resolve_or_download(model, settings.allow_downloads, settings.random_weights, settings.allow_pickle,
                                 settings.trust_remote_code)
    require_weights(source, settings.random_weights, settings.allow_pickle)
    resolved = resolve_device(settings.device)
    skipped = None if settings.quality and not settings.random_weights else (
        "random weights: quality needs trained weights" if settings.quality else "--no-quality")
    # NOTE: only when quality is measured: the choice looks at the device, which need not be touched otherwise
    reference, why = choose_reference(settings.reference, source, resolved) if skipped is None else (
        settings.reference or RunConfig.reference, None)
    configs = settings.configs(model, resolved, quality=skipped is None, reference=reference)
    check_up_front(configs, source)
    output_dir = Path(settings.output) if settings.output is not None else default_output_dir(source.name)
    with terminate_as_interrupt(), hold_run_folder(output_dir):
        rows = run_sweep(configs, output_dir, on_event, resume=settings.resume, quality_skipped=skipped)
        _, problems = read_results(output_dir / RESULTS_FILE)
        outcome = RunOutcome(rows, output_dir, quality_skipped=skipped, problems=tuple(str(p) for p in problems),
                             reference_choice=why if skipped is None else None)
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
    for config in configs:  # every point of the matrix must fit the model's positions, its layers their devices
        check_against_model(config, spec)
        check_placement(config, planned_placement(config, spec))
    for config in configs[:1]:  # every configuration of a sweep shares the quality settings
        if config.quality:
            quality = config.quality_spec()
            check_eval_text(quality)
            check_reference_size(quality.eval_tokens - 1, spec.vocab_size, quality.logprob_dtype)


# NOTE: the fp32 reference may use at most this share of the device's memory, so it never crowds the machine
REFERENCE_MEMORY_SHARE = 0.5


def choose_reference(asked: str | None, source: ModelSource, device: str) -> tuple[str, str]:
    """The quality reference and why: as asked, else fp32 where its planned footprint fits in half the device's
    memory (bf16 on disk rounds every weight, so a bf16 reference is itself noisy), else bf16. The device's total,
    not what is free now, so the same command on the same machine always chooses the same (the choice is part of
    every row's hash, and --resume relies on it)."""
    if asked is not None:
        return asked, f"{asked}, as asked (--reference)"
    planned = plan_point(source.spec(), get_scheme("fp32"), context=1, batch=1, kv_dtype="fp32",
                         device=device).total_bytes
    total = device_memory_bytes(device)
    if total is not None and planned <= REFERENCE_MEMORY_SHARE * total:
        return "fp32", (f"fp32, the default where it fits in half the memory: {planned / 2**30:.2f} GiB planned of "
                        f"{total / 2**30:.2f} GiB on {device}")
    where = "unknown" if total is None else f"{total / 2**30:.2f} GiB"
    return "bf16", f"bf16: fp32 would need {planned / 2**30:.2f} GiB, more than half of the {where} on {device}"


def device_memory_bytes(device: str) -> int | None:
    """The device's total memory: the machine's physical memory for the CPU; NVML's total for the first GPU on CUDA (NVML,
    not torch, so this process opens no CUDA context that would take memory from the workers)."""
    if device == "cuda":
        from .trackers import PynvmlDevice

        try:
            return PynvmlDevice().total_bytes()
        except Exception:  # noqa: BLE001 - no NVML: the choice falls back to bf16 and says the memory is unknown
            return None
    return machine_memory_bytes()


def zoo_folder(model: str) -> str:
    """A bundled real model's name (e.g. smollm2) becomes its cached folder, converted on first use."""
    from .. import zoo

    if model.strip().lower() not in zoo.ZOO or (profiles_dir() / "models" / model.strip().lower()).is_dir():
        return model
    return str(zoo.ensure_model(model).folder)


def run_sweep(configs: Sequence[RunConfig], output_dir: Path, on_event: OnEvent | None = None,
              resume: bool = False, quality_skipped: str | None = None) -> list[RunResult]:
    """Run each load configuration in its own process, its shape points inside it, appending each point's row
    to results.jsonl as it finishes. Rows come back in the order of `configs`.

    With `resume`, points whose final row is in the file already are not run again (an interrupted one is);
    without it, a folder that holds results is refused rather than mixed into.
    """
    def notify(event: Event) -> None:
        if on_event is not None:
            on_event(replace(event, output_dir=Path(output_dir)))

    sources = {model: resolve_model(model) for model in dict.fromkeys(c.model for c in configs)}
    planned = [planned_row(config, quality_skipped, sources[config.model]) for config in configs]
    rows: dict[int, RunResult] = {}
    total = len(configs)
    bandwidth: dict[str, Any] = {}  # measured by the first worker, handed to the others: once per run
    with terminate_as_interrupt(), hold_run_folder(output_dir):
        results_path = prepare_output(output_dir)
        done = resume_rows(results_path, planned, resume, lambda row: bool(reference_unusable(row, output_dir)))
        if sources:
            keep_model_config(next(iter(sources.values())), output_dir)

        def finished(index: int, row: RunResult) -> None:
            append_result(results_path, row)
            rows[index] = row
            copied = row.environment.get("copy_bandwidth") if isinstance(row.environment, dict) else None
            if not bandwidth and isinstance(copied, dict) and copied.get("bytes_per_second"):
                bandwidth.update(copied)
            notify(Event("done", index, total, configs[index], row=row))

        for load in group_loads(configs, lambda c: planned[configs.index(c)].planned_total_bytes or 0):
            for index in load:
                if planned[index].config_hash in done:
                    rows[index] = done[planned[index].config_hash]
                    notify(Event("done", index, total, configs[index], row=rows[index], resumed=True))
            # NOTE: a resumed load remembers its out-of-memory points: what they bound is skipped, not retried
            out_of_memory = [configs[i] for i in load if i in rows and rows[i].status == "oom"]
            todo = skip_dominated([i for i in load if i not in rows], configs, out_of_memory,
                                  lambda i, why: finished(i, build_row(planned[i], "skipped", why, None)))
            if todo:
                notify(Event("start", todo[0], total, configs[todo[0]]))
                run_load([configs[i] for i in todo], [planned[i] for i in todo], output_dir,
                         lambda i, phase, todo=todo: notify(Event("phase", todo[i], total, configs[todo[i]], phase)),
                         lambda i, row, todo=todo: finished(todo[i], row), bandwidth or None)
    return [rows[i] for i in range(total)]


def planned_row(config: RunConfig, quality_skipped: str | None = None,
                source: ModelSource | None = None) -> RunResult:
    """The row before measurement: identity, settings, hash, and the planner's figures for this run."""
    from .. import __version__  # here: the package's __init__ imports this module before it sets its version

    source = source or resolve_model(config.model)
    identity, spec = model_identity(source, config.random_weights, config.allow_pickle), source.spec()
    plan = replace(plan_point(spec, config.scheme, context=config.cached_tokens, batch=config.batch,
                              kv_dtype=kv_dtype_for(config.scheme), attn_impl=config.attn_impl, device=config.device,
                              prefill_tokens=config.prompt_tokens),
                   placement=planned_placement(config, spec))
    return RunResult(model=source.name, dtype=config.dtype, status="error", config_hash=config_hash(identity, config),
                     device=config.device, settings={**config.settings(), "model_source": identity},
                     plan=plan.as_dict(), falconbench_version=__version__,
                     quality={"skipped": f"quality not measured: {quality_skipped}"} if quality_skipped else {})


def run_load(configs: Sequence[RunConfig], bases: Sequence[RunResult], output_dir: Path,
             on_phase: Callable[[int, str], None], on_row: Callable[[int, RunResult], None],
             bandwidth: dict[str, Any] | None = None) -> None:
    """The points of one load, in order, in a spawned worker; each row goes to `on_row` as it arrives. A worker that
    dies takes the point in flight with it (its row says how); when it died of memory, the points that need at
    least as much are skipped, and a fresh worker runs the rest."""
    pending = list(range(len(configs)))
    while pending:
        answered = run_isolated([configs[i] for i in pending], [bases[i] for i in pending], output_dir,
                                lambda i, phase: on_phase(pending[i], phase),
                                lambda i, row: on_row(pending[i], row), bandwidth)
        if answered is None:
            return
        pending = [pending[i] for i in answered]


def run_isolated(configs: Sequence[RunConfig], bases: Sequence[RunResult], output_dir: Path,
                 on_phase: Callable[[int, str], None], on_row: Callable[[int, RunResult], None],
                 bandwidth: dict[str, Any] | None = None) -> list[int] | None:
    """Spawn one worker for the points of one load and relay its phases and rows. Returns None when every point
    has its row, else the indices still to run after the worker died."""
    context = multiprocessing.get_context("spawn")
    receiver, sender = context.Pipe(duplex=False)
    log_path = output_dir / WORKER_LOG
    first = configs[0]
    try:
        with open(log_path, "a", encoding="utf-8") as log:
            log.write(f"\n=== {bases[0].model} {first.dtype} {first.attn_impl} {len(configs)} point(s) {_now()} ===\n")
    except OSError as exc:
        raise RunError(f"cannot write {log_path}: {exc.strerror or exc}. Free some space or choose another "
                       "--output folder") from None
    process = context.Process(target=worker.child_main, args=([c.as_dict() for c in configs], sender,
                                                              str(log_path), str(output_dir), bandwidth),
                              name=f"falconbench-{first.dtype}-{first.attn_impl}")
    answered: set[int] = set()
    failure = None
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
                on_phase(message["index"], message["phase"])
            elif message["kind"] == "point":
                index = message["index"]
                answered.add(index)
                on_row(index, build_row(bases[index], message["status"], message["error"], message["measurement"]))
            elif message["kind"] == "failed":
                failure = message
        process.join()
    except KeyboardInterrupt as stop:
        if process.pid is not None:
            process.kill()
            process.join()
        how = f"by {stop.args[0]}" if stop.args else "by the user (Ctrl-C)"
        in_flight = next((i for i in range(len(configs)) if i not in answered), None)
        if in_flight is not None:
            append_result(output_dir / RESULTS_FILE, build_row(bases[in_flight], "interrupted",
                                                               f"interrupted {how}", None))
        raise
    finally:
        if process.is_alive():  # any other way out of this function: never leave the worker running
            process.kill()
            process.join()
        sender.close()
        receiver.close()
    left = [i for i in range(len(configs)) if i not in answered]
    if not left:
        return None
    if failure is not None:  # the worker could not start measuring: every point left shares its failure
        for index in left:
            on_row(index, build_row(bases[index], failure["status"], failure["error"], None))
        return None
    died, rest = left[0], left[1:]
    status = death_status(process.exitcode, first.memory_cap_bytes)
    on_row(died, build_row(bases[died], status, death_message(process.exitcode, log_path, first.memory_cap_bytes),
                           None))
    if status == "oom":
        rest = skip_dominated(rest, configs, [configs[died]], lambda i, why: on_row(i, build_row(
            bases[i], "skipped", why, None)))
    return rest or None


def skip_dominated(indices: Sequence[int], configs: Sequence[RunConfig], out_of_memory: Sequence[RunConfig],
                   skip: Callable[[int, str], None]) -> list[int]:
    """Record the points of `indices` that an out-of-memory point bounds as skipped; the others, still to run."""
    rest = []
    for index in indices:
        reason = skip_reason(configs[index], out_of_memory)
        if reason is None:
            rest.append(index)
        else:
            skip(index, reason)
    return rest


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


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")
