"""The run folder: created and checked writable before any work, the model's config kept beside the results, and
what `--resume` finds there (refusing rows of another run, dropping interrupted ones so each configuration ends
with exactly one final row).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

from ..errors import RunError, UsageError
from ..results import RESULTS_FILE, RunResult, read_results, write_atomic
from ..sources import ModelSource


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


def resume_rows(path: Path, planned: Sequence[RunResult], resume: bool) -> dict[str, RunResult]:
    """The final rows already in `path` for the planned configurations, by config_hash.

    Refuses a file that holds rows of other configurations (another model or other settings), and, without
    `resume`, any file with rows at all. Interrupted rows are dropped from the file (their configuration runs
    again), so after the sweep it holds exactly one final row per configuration. Invalid lines are kept as they
    are and reported by `falconbench report`.
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
    done = {row.config_hash: row for row in rows if row.status != "interrupted"}
    if len(done) < len(rows):
        drop_interrupted(path)
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


def drop_interrupted(path: Path) -> None:
    """Rewrite `path` without its interrupted rows (every other line kept byte for byte), atomically."""
    kept = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines(keepends=True):
        try:
            interrupted = json.loads(line).get("status") == "interrupted"
        except (ValueError, AttributeError):
            interrupted = False
        if not interrupted:
            kept.append(line if line.endswith("\n") else line + "\n")
    write_atomic(path, "".join(kept).encode("utf-8"))
