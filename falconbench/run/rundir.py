"""The run folder: one writer at a time (an flock held from the sweep's start to the end of its report), created
and checked writable before any work, the model's config kept beside the results, and what `--resume` finds there
(refusing rows of another run, dropping interrupted ones so each configuration ends with exactly one final row).
"""

from __future__ import annotations

import fcntl
import json
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Sequence

from ..errors import FolderBusyError, RunError, UsageError
from ..results import RESULTS_FILE, RunResult, read_results, write_atomic
from ..sources import ModelSource

LOCK_FILE = ".falconbench.lock"
# Temporary files of atomic writes (results.write_atomic, quality.reference.write_reference); under the lock no
# other process writes the folder, so any found there was left by a killed one.
STALE_TEMP_PATTERNS = (".*.tmp", ".reference-*.tmp-*")
_held: dict[Path, int] = {}  # folders this process has locked, so nested holders (run, then its report) share it


@contextmanager
def hold_run_folder(output_dir: Path) -> Iterator[Path]:
    """Create `output_dir` and hold its lock while the block runs; refuse a folder another process holds.

    NOTE: flock belongs to the open file, so the kernel drops it when the holder dies however it dies (kill -9
    included): a lock left behind never blocks. Workers never inherit it (Python opens files non-inheritable).
    """
    folder = Path(output_dir).resolve() if str(output_dir) else Path(output_dir)
    if folder in _held:
        yield folder
        return
    descriptor = open_lock(Path(output_dir))
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(descriptor, 64, 0).decode("ascii", errors="replace").strip() or "unknown"
        os.close(descriptor)
        raise FolderBusyError(f"{output_dir} is in use by another falconbench run (process {holder}). Wait for it "
                              "to finish, or choose another --output") from None
    try:
        os.ftruncate(descriptor, 0)
        os.pwrite(descriptor, f"{os.getpid()}\n".encode(), 0)
        _held[folder] = descriptor
        remove_stale_temporaries(folder)
        yield folder
    finally:
        _held.pop(folder, None)
        os.close(descriptor)  # releases the lock


def open_lock(output_dir: Path) -> int:
    """The lock file's descriptor, creating the folder first; an unwritable place is one clear error."""
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
        return os.open(output_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o666)
    except OSError as exc:
        raise RunError(f"cannot write results into {output_dir}: {exc.strerror or exc}. Choose another --output")\
            from None


def remove_stale_temporaries(folder: Path) -> None:
    """Delete what killed writers left (a half reference can take hundreds of MB); only under the lock."""
    for pattern in STALE_TEMP_PATTERNS:
        for path in folder.glob(pattern):
            try:
                path.unlink()
            except OSError:  # gone already, or not ours to delete: it is only space
                pass


def prepare_output(output_dir: Path) -> Path:
    """Create the output folder and check that results can be appended there, before any work is done."""
    path = Path(output_dir) / RESULTS_FILE
    try:
        Path(output_dir).mkdir(parents=True, exist_ok=True)
        with open(path, "a", encoding="utf-8"):
            pass
    except OSError as exc:
        raise RunError(f"cannot write results into {output_dir}: {exc.strerror or exc}. Choose another --output")\
            from None
    return path


def keep_model_config(source: ModelSource, output_dir: Path) -> None:
    """A copy of the measured model's config.json in the run folder, so its report can still plan the model
    once the run folder travels without the model (one model per sweep; the first one's is kept)."""
    target = Path(output_dir) / "config.json"
    if not target.exists():
        try:
            write_atomic(target, source.config_path.read_bytes())
        except OSError as exc:
            raise RunError(f"cannot copy {source.config_path} into {output_dir}: {exc.strerror or exc}") from None


def resume_rows(path: Path, planned: Sequence[RunResult], resume: bool,
                still_needed=lambda row: False) -> dict[str, RunResult]:
    """The final rows already in `path` for the planned configurations, by config_hash.

    Refuses a file that holds rows of other configurations (another model or other settings), and, without
    `resume`, any file with rows at all. Interrupted rows, and rows for which `still_needed` says the work is not
    done (a reference row whose stored reference is missing or fails its check), are dropped from the file (their
    configuration runs again), so after the sweep it holds exactly one final row per configuration. Invalid lines
    are kept as they are and reported by `falconbench report`. Call it only while holding the folder's lock.
    """
    rows, _problems = read_results(path)
    if not rows:
        return {}
    if not resume:
        raise UsageError(f"{path} already holds {len(rows)} row(s). Pass --resume to finish that run without "
                         "redoing what is done, or choose a new --output")
    wanted = {row.config_hash: row for row in planned}
    foreign = [row for row in rows if row.config_hash not in wanted]
    if foreign:
        raise UsageError(f"{path} holds rows of another run, so --resume would mix them: "
                         f"{why_foreign(foreign[0], planned)}. Use the same model and settings as that run, or "
                         "choose a new --output")
    done = {row.config_hash: row for row in rows if row.status != "interrupted" and not still_needed(row)}
    if len(done) < len(rows):
        drop_rows(path, {row.config_hash for row in rows} - set(done))
    return done


def why_foreign(row: RunResult, planned: Sequence[RunResult]) -> str:
    """What differs between a row in the file and this run's configurations."""
    models = sorted({p.model for p in planned})
    if row.model not in models:
        return f"its model is {row.model!r}, this run's is {models[0]!r}"
    same = [p for p in planned if p.dtype == row.dtype] or list(planned)
    mine, theirs = same[0].settings, row.settings
    differ = sorted(k for k in set(mine) | set(theirs) if mine.get(k) != theirs.get(k))
    if not differ:
        return f"its {row.dtype} row has configuration hash {row.config_hash}, unknown to this run"
    shown = "; ".join(f"{k}: {theirs.get(k)!r} there, {mine.get(k)!r} now" for k in differ[:3])
    return f"its {row.dtype} row differs in {shown}"


def drop_rows(path: Path, hashes: set[str]) -> None:
    """Rewrite `path` without the rows of configurations `hashes` (every other line kept byte for byte),
    atomically. Only under the folder's lock: a rename would discard a row another writer appended meanwhile."""
    kept = []
    for line in path.read_bytes().splitlines(keepends=True):
        try:
            dropped = json.loads(line).get("config_hash") in hashes
        except (ValueError, AttributeError, RecursionError, TypeError):  # TypeError: an unhashable config_hash
            dropped = False
        if not dropped:
            kept.append(line if line.endswith(b"\n") else line + b"\n")
    write_atomic(path, b"".join(kept))


def reference_unusable(row: RunResult, output_dir: Path) -> str | None:
    """Why a finished reference row must run again, or None: its quality was not measured (its reference write
    failed, a full disk), or its stored reference is missing or fails verify_reference against this model's
    weights. Rows of other schemes, and runs without quality, are never held back."""
    from ..quality.reference import verify_reference

    settings = row.settings.get("quality")
    if row.status != "ok" or not isinstance(settings, dict) or settings.get("reference") != row.dtype:
        return None
    name = row.quality.get("reference_file")
    if not isinstance(name, str) or Path(name).name != name or not name.startswith("reference-"):
        return "its quality was not measured, so no reference was stored"
    source = row.settings.get("model_source")
    weights = source.get("weights_fingerprint") if isinstance(source, dict) else None
    return verify_reference(Path(output_dir) / name, {"reference": row.dtype, "weights": weights})
