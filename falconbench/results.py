"""Run results: one row per configuration, appended to `results.jsonl` as each configuration finishes.

A row is written as one whole line and flushed, so a crash never leaves half a row; a reader skips (and
reports, by line number) anything that is not a valid row: a line that is not JSON, too long or nested too deeply,
a field of the wrong type, a schema it does not know, or settings that do not match the row's own hash.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import secrets
import stat
from contextlib import suppress
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Literal, Sequence

from .errors import NotFoundError, ResultsError

Status = Literal["ok", "oom", "error", "interrupted", "skipped"]
STATUSES: tuple[str, ...] = ("ok", "oom", "error", "interrupted", "skipped")
RESULTS_FILE = "results.jsonl"
# NOTE: 2 adds falconbench_version; 3: one row per shape point of the run matrix, the plan in its own field (rows of
# schemas 1 and 2 read with their planned_* figures as their plan)
SCHEMA_VERSION = 3
KNOWN_SCHEMAS = (1, 2, 3)
MAX_LINE_BYTES = 2**20  # a row is a few KiB; a longer line is not one, and reading it whole could exhaust memory


@dataclass(frozen=True)
class RunResult:
    """What one configuration measured, beside what the planner predicted. Bytes are int, times are seconds."""

    model: str
    dtype: str
    status: str
    config_hash: str = ""
    error: str | None = None
    device: str = "cpu"
    settings: dict[str, Any] = field(default_factory=dict)  # every knob of the configuration
    environment: dict[str, Any] = field(default_factory=dict)  # versions, CUDA, driver, GPU/CPU name
    # memory, measured
    weights_bytes: int | None = None
    kv_cache_bytes: int | None = None
    peak_memory_bytes: int | None = None  # CUDA: NVML used − baseline; CPU: peak RSS − baseline
    memory: dict[str, Any] = field(default_factory=dict)  # per-phase detail (torch allocated/reserved, RSS...)
    # the planner's figures for this point, in its own field: PlanRow.as_dict() (weights, KV cache, each runtime
    # estimate, total), so every estimate is there to compare with what was measured
    plan: dict[str, Any] = field(default_factory=dict)
    # quantization guard
    quantized_layers: int | None = None
    linear_layers: int | None = None
    quantized_params: int | None = None  # weights bitsandbytes holds (logical elements), of `params`
    params: int | None = None
    # latency
    load_seconds: float | None = None
    ttft_seconds: float | None = None
    decode_tokens_per_second: float | None = None
    latency: dict[str, Any] = field(default_factory=dict)  # read/quantize split, p90, CV, raw samples
    # quality against the reference scheme
    perplexity: float | None = None
    kl_divergence: float | None = None
    top1_agreement: float | None = None
    quality: dict[str, Any] = field(default_factory=dict)
    timestamp: str = ""
    falconbench_version: str = ""  # of the falconbench that measured the row
    schema: int = SCHEMA_VERSION

    def __post_init__(self):
        if self.status not in STATUSES:
            raise ValueError(f"status must be one of {', '.join(STATUSES)}, not {self.status!r}")

    @property
    def planned_weights_bytes(self) -> int | None:
        return as_mapping(self.plan).get("weights_bytes")

    @property
    def planned_kv_cache_bytes(self) -> int | None:
        return as_mapping(self.plan).get("kv_cache_bytes")

    @property
    def planned_total_bytes(self) -> int | None:
        return as_mapping(self.plan).get("total_bytes")

    def expected_hash(self) -> str:
        """The configuration hash this row's own dtype and settings give (see settings_hash)."""
        return settings_hash(self.dtype, self.settings)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "RunResult":
        """A row from its JSON form; unknown keys are ignored, missing required ones raise ValueError. A row of
        schema 1 (the plan's three figures as planned_* fields) reads with those figures as its plan."""
        if not isinstance(data, dict):
            raise ValueError(f"a row must be a JSON object, not {type(data).__name__}")
        known = {f.name: f.type for f in fields(cls)}
        missing = [k for k in ("model", "dtype", "status") if k not in data]
        if missing:
            raise ValueError(f"missing field(s): {', '.join(missing)}")
        values = {k: v for k, v in data.items() if k in known}
        for name, value in values.items():
            check_field(name, known[name], value)
        if values.get("schema", SCHEMA_VERSION) not in KNOWN_SCHEMAS:
            raise ValueError(f"schema {values['schema']!r} is not one this falconbench reads "
                             f"({', '.join(map(str, KNOWN_SCHEMAS))}); a newer falconbench wrote it?")
        if "plan" not in data:
            values["plan"] = {name: data[f"planned_{name}"] for name in LEGACY_PLAN_FIELDS
                              if f"planned_{name}" in data}
        row = cls(**values)
        if row.config_hash and row.config_hash != row.expected_hash():
            raise ValueError(f"its {row.dtype} settings hash to {row.expected_hash()}, not to its config_hash "
                             f"{row.config_hash}: the row was edited")
        return row


LEGACY_PLAN_FIELDS = ("weights_bytes", "kv_cache_bytes", "total_bytes")


# What a field read from a file may hold, by its annotation: JSON numbers for the numeric ones (bool excluded).
FIELD_TYPES: dict[str, tuple[type, ...]] = {
    "str": (str,), "str | None": (str, type(None)), "int": (int,), "int | None": (int, type(None)),
    "float | None": (int, float, type(None)), "dict[str, Any]": (dict,),
}


def check_field(name: str, annotation: str, value: Any) -> None:
    """Refuse a value of the wrong JSON type for a row field (a hand-edited file may hold anything)."""
    allowed = FIELD_TYPES[annotation]
    if isinstance(value, bool) or not isinstance(value, allowed):
        raise ValueError(f"{name} must be {annotation.replace(' | None', ' or null')}, not "
                         f"{type(value).__name__}")


def settings_hash(dtype: str, settings: dict[str, Any]) -> str:
    """16 hex digits naming one configuration: the model's identity (settings["model_source"]), the dtype and
    every other setting. `run` names each row by it, and a reader recomputes it, so an edited row is told apart."""
    settings = as_mapping(settings)
    others = {k: v for k, v in settings.items() if k != "model_source"}
    payload = {"model": settings.get("model_source"), "dtype": dtype, "settings": others}
    text = json.dumps(payload, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


# Environment keys that may name the device a row was measured on, most specific first (`run` records "gpu" and
# "cpu"; the others are what hand-made or older files may use).
GPU_NAME_KEYS = ("gpu_name", "gpu", "cuda_device_name", "device_name")
DEVICE_NAME_KEYS = GPU_NAME_KEYS + ("cpu_name", "cpu", "processor")


def as_mapping(value: Any) -> dict[str, Any]:
    """A row's dict field, or {} when a hand-edited file put something else there."""
    return value if isinstance(value, dict) else {}


def as_float(value: Any) -> float | None:
    """A finite number from a row, as float; None for anything else (rows come from files and may be odd)."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    return float(value) if ok else None


def environment_name(environment: Any, keys: Sequence[str] = DEVICE_NAME_KEYS) -> str | None:
    """The first non-empty name among `keys` in a row's environment."""
    for key in keys:
        value = as_mapping(environment).get(key)
        if isinstance(value, str) and value.strip():
            return value.strip()
    return None


def append_result(path: Path, result: RunResult) -> None:
    """Append one row as one line, synced, so finished work survives a crash; a write that fails part-way (a
    full disk) is cut back off, so the file never holds half a row."""
    append_row(path, result.as_dict())


def append_row(path: Path, row: dict[str, Any]) -> None:
    """`append_result` for any row as a dict (a fine-tuning row has its own shape and a `task` field)."""
    data = (json.dumps(row, default=str, allow_nan=True) + "\n").encode("utf-8")
    try:
        descriptor = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o666)
    except OSError as exc:
        raise results_write_error(path, exc) from None
    start = None
    try:
        start = os.lseek(descriptor, 0, os.SEEK_END)
        if start and os.pread(descriptor, 1, start - 1) != b"\n":
            data = b"\n" + data  # a cut-short last line (a crash, a copy) must not swallow this row
        view = memoryview(data)
        while view:  # NOTE: os.write may write part of the row and fail only on the next call
            view = view[os.write(descriptor, view):]
        os.fsync(descriptor)
    except BaseException as exc:  # a full disk, or an interrupt part-way: the file never keeps half a row
        if start is not None:
            with suppress(OSError):
                os.ftruncate(descriptor, start)
        if isinstance(exc, OSError):
            raise results_write_error(path, exc) from None
        raise
    finally:
        os.close(descriptor)


def results_write_error(path: Path, exc: OSError) -> ResultsError:
    return ResultsError(f"cannot write {path}: {exc.strerror or exc}. Free some space or choose another "
                        "--output folder")


@dataclass(frozen=True)
class ReadProblem:
    """A line of a results file that is not a valid row."""

    path: str
    line: int
    reason: str

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: {self.reason}"


# A row's "task": one vocabulary for the whole results file. A row without one is an inference row (files from
# before fine-tuning); any other value is reported as a read problem, never dropped in silence.
INFERENCE_TASK = "inference"
FINETUNE_TASK = "finetune"
TASKS: tuple[str, ...] = (INFERENCE_TASK, FINETUNE_TASK)


@dataclass(frozen=True)
class ResultsFile:
    """A results.jsonl read once: its inference rows, its fine-tuning rows (as dicts, in file order; the report's
    finetune_results reads them) and a problem for each line that is neither."""

    inference: list[RunResult]
    finetune: list[dict[str, Any]]
    problems: list[ReadProblem]


def read_results_file(path: Path) -> ResultsFile:
    """Every valid row of a results.jsonl by task, and a problem for each line that is not one (never raises on
    content)."""
    path = Path(path)
    if path.is_dir():
        path = path / RESULTS_FILE
    rows, finetune, problems = [], [], []
    with open_regular(path, f"Pass a run folder or its {RESULTS_FILE}") as handle:
        for number, line in enumerate(bounded_lines(handle), start=1):
            if line is None:
                problems.append(ReadProblem(str(path), number, f"longer than {MAX_LINE_BYTES // 2**20} MiB; not a "
                                                                "results row"))
            elif line.strip():
                try:
                    data = json.loads(line.rstrip(b"\r\n").decode("utf-8", errors="replace"))
                    task = data.get("task", INFERENCE_TASK) if isinstance(data, dict) else INFERENCE_TASK
                    if task == FINETUNE_TASK:
                        finetune.append(data)
                    elif task == INFERENCE_TASK:
                        rows.append(RunResult.from_dict(data))
                    else:
                        problems.append(ReadProblem(str(path), number, f"unknown task {task!r}; falconbench writes "
                                                                        f"{', '.join(TASKS)}"))
                except json.JSONDecodeError as exc:
                    problems.append(ReadProblem(str(path), number, f"not valid JSON ({exc.msg}: column {exc.colno}); "
                                                                    "truncated write?"))
                except RecursionError:
                    problems.append(ReadProblem(str(path), number, "not a results row: JSON nested too deeply"))
                except (TypeError, ValueError) as exc:
                    problems.append(ReadProblem(str(path), number, f"not a results row: {exc}"))
    return ResultsFile(rows, finetune, problems)


def read_results(path: Path) -> tuple[list[RunResult], list[ReadProblem]]:
    """The inference rows of a results.jsonl, and every line's problem (read_results_file's)."""
    read = read_results_file(path)
    return read.inference, read.problems


def read_finetune_rows(path: Path) -> list[dict[str, Any]]:
    """The fine-tuning rows of a results.jsonl (read_results_file's); a folder without the file has none."""
    path = Path(path)
    path = path / RESULTS_FILE if path.is_dir() else path
    return read_results_file(path).finetune if path.is_file() else []


def open_regular(path: Path, how_to_fix: str):
    """`path` opened for binary reading, refused unless it is a regular file: a FIFO would block the reader and
    a device such as /dev/zero never ends. O_NONBLOCK only keeps opening a FIFO from waiting for a writer."""
    try:
        descriptor = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except FileNotFoundError:
        raise NotFoundError(f"{path}: no such file or folder. {how_to_fix}") from None
    except OSError as exc:
        raise ResultsError(f"cannot read {path}: {exc.strerror or exc}. {how_to_fix}") from None
    if not stat.S_ISREG(os.fstat(descriptor).st_mode):
        os.close(descriptor)
        raise ResultsError(f"{path} is not a regular file. {how_to_fix}")
    os.set_blocking(descriptor, True)
    return os.fdopen(descriptor, "rb")


def bounded_lines(handle, limit: int = MAX_LINE_BYTES):
    """The lines of a binary file, each at most `limit` bytes; a longer line is skipped whole and yields None."""
    while True:
        line = handle.readline(limit + 1)
        if not line:
            return
        if len(line) <= limit or line.endswith(b"\n"):
            yield line
            continue
        while line and not line.endswith(b"\n"):  # the rest of the long line, read in bounded pieces
            line = handle.readline(limit)
        yield None


def latest_rows(rows: list[RunResult]) -> list[RunResult]:
    """The last row of each configuration (keyed by config_hash, or model+dtype), in first-seen order."""
    latest: dict[str, RunResult] = {}
    for row in rows:
        latest[row.config_hash or f"{row.model}/{row.dtype}"] = row
    return list(latest.values())


def write_atomic(path: Path, data: bytes) -> None:
    """Write `data` to a new file beside `path`, then rename it over `path`: readers never see half a file.

    NOTE: os.open with mode 0o666 lets the umask decide the permissions, as a plain open() would; tempfile's
    files are private (0o600), which would hide a report from the rest of a team.
    """
    temporary = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    try:
        descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        with os.fdopen(descriptor, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except OSError as exc:
        temporary.unlink(missing_ok=True)
        raise ResultsError(f"cannot write {path}: {exc.strerror or exc}. Free some space or choose another "
                           "folder") from None
    except BaseException:  # an interrupt (SIGINT, SIGTERM) while writing: no temporary file left behind
        temporary.unlink(missing_ok=True)
        raise
