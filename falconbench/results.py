"""Run results: one row per configuration, appended to `results.jsonl` as each configuration finishes.

A row is written as one whole line and flushed, so a crash never leaves half a row; a reader skips (and
reports, by line number) anything that is not a valid row.
"""

from __future__ import annotations

import json
import math
import os
import secrets
from contextlib import suppress
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Literal, Sequence

from .errors import ResultsError

Status = Literal["ok", "oom", "error", "interrupted", "skipped"]
STATUSES: tuple[str, ...] = ("ok", "oom", "error", "interrupted", "skipped")
RESULTS_FILE = "results.jsonl"
SCHEMA_VERSION = 1


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
    # memory, planned
    planned_weights_bytes: int | None = None
    planned_kv_cache_bytes: int | None = None
    planned_total_bytes: int | None = None
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
    schema: int = SCHEMA_VERSION

    def __post_init__(self):
        if self.status not in STATUSES:
            raise ValueError(f"status must be one of {', '.join(STATUSES)}, not {self.status!r}")

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "RunResult":
        """A row from its JSON form; unknown keys are ignored, missing required ones raise ValueError."""
        if not isinstance(data, dict):
            raise ValueError(f"a row must be a JSON object, not {type(data).__name__}")
        known = {f.name for f in fields(cls)}
        missing = [k for k in ("model", "dtype", "status") if k not in data]
        if missing:
            raise ValueError(f"missing field(s): {', '.join(missing)}")
        return cls(**{k: v for k, v in data.items() if k in known})


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
    except OSError as exc:
        if start is not None:
            with suppress(OSError):
                os.ftruncate(descriptor, start)
        raise results_write_error(path, exc) from None
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


def read_results(path: Path) -> tuple[list[RunResult], list[ReadProblem]]:
    """Every valid row of a results.jsonl, and a problem for each line that is not one (never raises on content)."""
    path = Path(path)
    if path.is_dir():
        path = path / RESULTS_FILE
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError as exc:
        raise ResultsError(f"cannot read {path}: {exc.strerror or exc}. Pass a run folder or its "
                           f"{RESULTS_FILE}") from None
    rows, problems = [], []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            data = json.loads(line)
            if isinstance(data, dict) and data.get("task", "inference") != "inference":
                continue  # a fine-tuning row (falconbench.train.sweep reads those)
            rows.append(RunResult.from_dict(data))
        except json.JSONDecodeError as exc:
            problems.append(ReadProblem(str(path), number, f"not valid JSON ({exc.msg}); truncated write?"))
        except (TypeError, ValueError) as exc:
            problems.append(ReadProblem(str(path), number, f"not a results row: {exc}"))
    return rows, problems


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
