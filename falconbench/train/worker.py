"""One fine-tuning configuration in its own spawned process, as `run` isolates each inference configuration:
peaks and allocator state never leak from one configuration into the next, and a crash is that row's status."""

from __future__ import annotations

import multiprocessing
import os
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any

from ..finetune import FinetuneSetup
from .measure import StepSettings


def child_main(folder: str, setup: dict[str, Any], settings: dict[str, Any], text: str, adapter_dir: str | None,
               conn, log_path: str | None) -> None:
    """Entry point of the spawned process: measure, send one result, exit without the interpreter's teardown."""
    from ..run.worker import describe, end_with_parent, is_oom, quiet_libraries, redirect_output

    end_with_parent()
    if log_path:
        redirect_output(log_path)
    os.environ.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    fields: dict[str, Any] = {}
    try:
        fields = measure(Path(folder), FinetuneSetup(**setup), StepSettings(**settings), Path(text),
                         Path(adapter_dir) if adapter_dir else None, quiet_libraries)
        conn.send({"status": "ok", "error": None, "fields": fields})
    except BaseException as exc:  # noqa: BLE001 - every failure becomes the row's status
        conn.send({"status": "oom" if is_oom(exc) else "error", "error": describe(exc), "fields": fields})
    finally:
        conn.close()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


def measure(folder: Path, setup: FinetuneSetup, settings: StepSettings, text: Path, adapter_dir: Path | None,
            quiet=lambda: None) -> dict[str, Any]:
    """Import the libraries, start the tracker (its baseline after the imports), then train and measure."""
    from ..run import environment
    from ..run.trackers import make_tracker
    from .measure import measure_finetune

    tracker = make_tracker(settings.device)
    tracker.read_baseline()
    import peft  # noqa: F401 - imported before the baseline, as run imports its libraries before measuring
    import torch  # noqa: F401
    import transformers  # noqa: F401

    quiet()
    tracker.start()
    fields = measure_finetune(folder, setup, settings, text, tracker, adapter_dir)
    fields["memory"] = tracker.summary()
    fields["peak_memory_bytes"] = tracker.peak_bytes()
    fields["environment"] = {**environment.environment(settings.device, getattr(tracker, "nvml", None)),
                             "peft": peft.__version__}
    return fields


def run_isolated(folder: Path, setup: FinetuneSetup, settings: StepSettings, text: Path,
                 adapter_dir: Path | None = None, log_path: Path | None = None) -> dict[str, Any]:
    """Measure one configuration in a fresh process; {"status", "error", "fields"} whatever happens to it."""
    context = multiprocessing.get_context("spawn")
    receive, send = context.Pipe(duplex=False)
    process = context.Process(target=child_main, args=(str(folder), asdict(setup), asdict(settings), str(text),
                                                       str(adapter_dir) if adapter_dir else None, send,
                                                       str(log_path) if log_path else None), daemon=True)
    process.start()
    send.close()
    try:
        message = receive.recv()
    except EOFError:
        message = None
    process.join()
    if message is None:
        code = process.exitcode
        reason = f"killed by signal {-code}" if code and code < 0 else f"exit code {code}"
        return {"status": "oom" if code == -9 else "error", "error": f"the training process died ({reason}) "
                "before it reported; the worker log has its last words", "fields": {}}
    return message
