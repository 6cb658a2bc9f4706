"""`falconbench run --task finetune`: each fine-tuning setup in its own process, its row (planned beside measured)
appended to the run folder's results.jsonl with `"task": "finetune"` as it finishes; `--resume` skips setups whose
row says ok."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Sequence

from ..errors import UsageError
from ..finetune import FinetuneSetup, plan_finetune_point
from ..results import FINETUNE_TASK as TASK
from ..results import RESULTS_FILE, append_row, read_finetune_rows
from ..sources import resolve_model
from .measure import StepSettings

OnRow = Callable[[dict[str, Any]], None]


@dataclass(frozen=True)
class FinetuneOutcome:
    rows: list[dict[str, Any]]
    output_dir: Path

    @property
    def results_path(self) -> Path:
        return self.output_dir / RESULTS_FILE


def config_hash(model_sha: str, setup: FinetuneSetup, settings: StepSettings) -> str:
    identity = {"task": TASK, "model": model_sha, "setup": asdict(setup), "steps": asdict(settings)}
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]


def run_finetune(model: str, setups: Sequence[FinetuneSetup], settings: StepSettings, output: Path | None = None,
                 resume: bool = False, on_row: OnRow | None = None) -> FinetuneOutcome:
    """Measure each setup in a fresh process; the Python API of `run --task finetune`."""
    from .. import __version__  # here: the package's __init__ imports the API before it sets its version
    from ..data import EVAL_TEXT
    from ..run.config import default_output_dir
    from ..run.orchestrator import zoo_folder
    from .worker import run_isolated

    if not setups:
        raise UsageError("no fine-tuning setup to run. Example: --task finetune --method lora")
    folder = zoo_folder(model)
    source = resolve_model(folder)
    if not any(source.folder.glob("*.safetensors")):
        raise UsageError(f"{source.folder} holds no safetensors weights; a fine-tune trains real weights. Pass a "
                         "model folder or the bundled smollm2")
    spec = source.spec()
    output_dir = Path(output) if output is not None else default_output_dir(source.name + "-finetune")
    output_dir.mkdir(parents=True, exist_ok=True)
    done = {r.get("config_hash") for r in read_finetune_rows(output_dir) if r.get("status") == "ok"}
    if done and not resume:
        raise UsageError(f"{output_dir} holds fine-tuning results already. Add --resume to finish that run, or "
                         "choose another --output")
    keys = []
    for setup in setups:
        key = config_hash(source.config_sha256, setup, settings)
        keys.append(key)
        if key in done:
            continue
        planned = plan_finetune_point(spec, setup, settings.device)
        adapter_dir = output_dir / "adapters" / key if setup.adapters else None
        message = run_isolated(source.folder, setup, settings, EVAL_TEXT, adapter_dir,
                               output_dir / "finetune-worker.log")
        row = {"task": TASK, "model": source.name, "dtype": setup.dtype, "status": message["status"],
               "error": message["error"], "device": settings.device, "config_hash": key,
               "settings": {**asdict(setup), **asdict(settings)}, "planned": planned.as_dict(),
               "measured": message["fields"], "falconbench_version": __version__,
               "timestamp": datetime.now(timezone.utc).isoformat()}
        append_row(output_dir / RESULTS_FILE, row)
        if on_row is not None:
            on_row(row)
    latest = {r.get("config_hash"): r for r in read_finetune_rows(output_dir)}
    return FinetuneOutcome([latest[k] for k in keys if k in latest], output_dir)
