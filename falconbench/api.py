"""The Python API: `plan`, `fit`, `run_benchmark` and `read_results`, each taking a single value or a list
wherever the command line takes a comma list, and returning typed rows. The CLI is a thin layer over these.

    >>> import falconbench
    >>> [row.kv_cache_bytes for row in falconbench.plan("falcon-7b", dtypes=["bf16", "nf4"])]
    [16777216, 16777216]
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Iterable, Sequence, TypeVar, overload

from . import planner
from .fit import FitResult
from .fit import fit as fit_model
from .errors import UsageError
from .planner import SAFETY_MARGIN, SEED_MODELS, PlanRow
from .results import ReadProblem, RunResult
from .schemes import DEFAULT_DTYPES, KV_DTYPE_AUTO

T = TypeVar("T")


def as_list(value: T | Iterable[T] | None, name: str) -> list[T]:
    """One value or an iterable of them, as a list: `"llama-7b"` is one model, never the letters of one."""
    if value is None:
        return []
    if isinstance(value, (str, bytes, int, float, os.PathLike)):
        return [value]  # type: ignore[list-item]
    try:
        return list(value)  # type: ignore[arg-type]
    except TypeError:
        raise UsageError(f"{name} must be a value or a list of them, got {type(value).__name__}") from None


# Suffixes of token counts and batches: binary, as context lengths are spoken of (8k = 8192).
COUNT_SUFFIXES = {"k": 2**10, "m": 2**20}


MAX_DIGITS = 19  # 10^19 tokens is past any count a plan or a run can use; int() would take 4,300 digits, slowly


def parse_count(value: int | str, label: str, example: str) -> int:
    """A positive whole number of tokens or sequences: 2048, "2048", "8k", "32K", "1m"."""
    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        return value
    raw = str(value).strip().lower()
    scale = COUNT_SUFFIXES.get(raw[-1:], 1)
    digits = raw[:-1] if scale > 1 else raw
    # NOTE: isascii, as isdigit and int() also read other scripts' digits ('٣' is 3, '０8' is 8)
    if isinstance(value, bool) or not (digits.isascii() and digits.isdigit()) or len(digits) > MAX_DIGITS \
            or int(digits) * scale <= 0:
        shown = repr(str(value)) if len(str(value)) <= 40 else repr(str(value)[:40]) + "..."
        raise UsageError(f"{label} must be a positive integer (8k = 8192), got {shown}. Example: {example}")
    return int(digits) * scale


def as_counts(value: int | str | Iterable[int | str] | None, name: str) -> list[int]:
    """One count or a list of them (`8k` allowed), as positive integers."""
    return [parse_count(v, name, f"{name}=[2048, \"8k\"]") for v in as_list(value, name)]


def plan(models: str | Iterable[str] = SEED_MODELS, dtypes: str | Iterable[str] = ("bf16",),
         contexts: int | Iterable[int] = 2048, batches: int | Iterable[int] = 1, kv_dtype: str = KV_DTYPE_AUTO,
         attn_impl: str = "sdpa", device: str = "cuda", device_map: str | None = None,
         max_memory: dict[str, int] | None = None) -> list[PlanRow]:
    """The cross product models × dtypes × contexts × batches, one PlanRow each (exact weights and KV bytes);
    with `device_map` and `max_memory` ({"0": bytes, "cpu": bytes}), where each row's layers go."""
    return planner.plan(as_list(models, "models"), as_list(dtypes, "dtypes"), as_counts(contexts, "contexts"),
                        as_counts(batches, "batches"), kv_dtype=kv_dtype, attn_impl=attn_impl, device=device,
                        device_map=device_map, max_memory=max_memory)


@overload
def fit(models: str, **options: Any) -> FitResult: ...
@overload
def fit(models: Sequence[str], **options: Any) -> list[FitResult]: ...


def fit(models, dtypes: str | Iterable[str] = DEFAULT_DTYPES, contexts: int | Iterable[int] = 2048,
        batches: int | Iterable[int] = 1, gpus: str | Iterable[str] | None = None, margin: float = SAFETY_MARGIN,
        calibrate: str | os.PathLike | None = None, kv_dtype: str = KV_DTYPE_AUTO, attn_impl: str = "sdpa",
        device: str = "cuda", device_map: str | None = None, max_memory: dict[str, int] | None = None):
    """Every GPU × dtype for each model: a FitResult for one model, a list of them for a list of models."""
    names = as_list(models, "models")
    if not names:
        raise UsageError("fit needs a model. Example: fit(\"falcon-7b\")")
    results = [fit_model(name, dtypes=as_list(dtypes, "dtypes"), contexts=as_counts(contexts, "contexts"),
                            batches=as_counts(batches, "batches"), gpus=as_list(gpus, "gpus") or None, margin=margin,
                            calibrate=str(calibrate) if calibrate is not None else None, kv_dtype=kv_dtype,
                            attn_impl=attn_impl, device=device, device_map=device_map, max_memory=max_memory)
               for name in names]
    return results[0] if isinstance(models, str) else results


def run_benchmark(model: str, dtypes: str | Iterable[str] = DEFAULT_DTYPES, prompt_tokens: int | Iterable[int] = 128,
                  new_tokens: int | Iterable[int] = 32, batches: int | Iterable[int] = 1,
                  attn_impls: str | Iterable[str] = "sdpa", on_event=None, **options: Any):
    """Measure `model` at every point of dtypes × attention kernels × prompt lengths × new-token counts × batch
    sizes, one fresh process per scheme and kernel; returns a RunOutcome whose `rows` are RunResults.

    The other options are `run`'s, spelled as Python names (device="cpu", output="reports/x", quality=False, ...);
    they make one typed RunSettings.
    """
    from .run import RunSettings
    from .run import run_benchmark as run_core

    settings = RunSettings(model=model, dtypes=tuple(as_list(dtypes, "dtypes")),
                           attns=tuple(as_list(attn_impls, "attn_impls")),
                           prompt_tokens=tuple(as_list(prompt_tokens, "prompt_tokens")),
                           new_tokens=tuple(as_list(new_tokens, "new_tokens")),
                           batches=tuple(as_list(batches, "batches")), **options)
    return run_core(settings, on_event)


def read_results(paths: str | os.PathLike | Iterable[str | os.PathLike]) -> tuple[list[RunResult], list[ReadProblem]]:
    """The rows of one or more run folders (or results.jsonl files), and the lines that are not rows."""
    from .results import read_results as read_file

    rows: list[RunResult] = []
    problems: list[ReadProblem] = []
    for path in as_list(paths, "paths"):
        found, bad = read_file(Path(path))
        rows += found
        problems += bad
    return rows, problems
