"""Issue 7: nothing finished is ever lost, no input crashes `run`, nothing runs that the user did not ask for.

Real `python -m falconbench run` processes are interrupted, their workers killed or starved, their output folder
filled or made unwritable, their model folders cut short; each ends in a clear status or one `Error:` line while
the finished rows stay whole. Spawned runs use the tiny random-weights Falcon and one thread each.
"""

from __future__ import annotations

import errno
import json
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

pytest.importorskip("torch")
pytest.importorskip("transformers")
psutil = pytest.importorskip("psutil")

from falconbench import results as results_module  # noqa: E402
from falconbench.cli import cli  # noqa: E402
from falconbench.errors import FalconbenchError, ModelNotFoundError, ResultsError, RunError  # noqa: E402
from falconbench.results import RESULTS_FILE, RunResult, append_result, read_results, write_atomic  # noqa: E402
from falconbench.run import RunConfig, run_sweep  # noqa: E402
from falconbench.run import orchestrator, worker  # noqa: E402
from falconbench.run.config import default_output_dir, sanitize  # noqa: E402
from falconbench.schemes import SCHEMES  # noqa: E402
from tiny_models import TINY_FALCON, write_config  # noqa: E402

pytestmark = pytest.mark.slow
DTYPES = ["bf16", "fp16", "fp32"]
TINY = ["--device", "cpu", "--prompt-tokens", "4", "--new-tokens", "2", "--repeats", "1", "--warmup", "0"]
SPAWNED = "multiprocessing.spawn"  # in the command line of every worker process
WAIT_SECONDS = 120  # generous: the cores are shared; a run that takes this long is a failure anyway


@pytest.fixture(scope="module", autouse=True)
def one_thread_per_worker():
    """Workers inherit the environment: one thread each keeps tiny models fast on a busy 2-core machine."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("OMP_NUM_THREADS", "1")
        yield


def run_args(model: Path, out: Path, dtypes=DTYPES, *extra: str) -> list[str]:
    return ["run", "-m", str(model), "--random-weights", "-d", ",".join(dtypes), *TINY, "-o", str(out), *extra]


def start_cli(args: list[str], cwd: Path, **popen) -> subprocess.Popen:
    """`python -m falconbench ARGS` in its own session (so a signal to its group reaches no one else)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "NO_COLOR": "1", "COLUMNS": "200"}
    return subprocess.Popen([sys.executable, "-m", "falconbench", *args], cwd=cwd, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True, **popen)


def wait_for(condition, what: str, process: subprocess.Popen | None = None):
    """Poll `condition` until it returns something true; fail (with the run's output) after WAIT_SECONDS."""
    deadline = time.monotonic() + WAIT_SECONDS
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        if process is not None and process.poll() is not None:
            pytest.fail(f"the run ended (code {process.returncode}) before {what}: {process.communicate()}")
        time.sleep(0.02)
    pytest.fail(f"timed out waiting for {what}")


def worker_starts(out: Path) -> int:
    """Configurations started in `out` so far: the parent writes one `=== ...` header per worker it starts."""
    log = out / "worker.log"
    return sum(line.startswith("=== ") for line in log.read_text().splitlines()) if log.exists() else 0


def spawned_workers(pid: int) -> list[psutil.Process]:
    """The measuring workers among `pid`'s descendants (not multiprocessing's resource tracker)."""
    found = []
    for child in psutil.Process(pid).children(recursive=True):
        try:
            if SPAWNED in " ".join(child.cmdline()) and child.status() != psutil.STATUS_ZOMBIE:
                found.append(child)
        except psutil.Error:  # ended while we looked
            pass
    return found


def statuses(out: Path) -> list[tuple[str, str]]:
    rows, problems = read_results(out)
    assert not problems, problems
    return [(row.dtype, row.status) for row in rows]


def assert_whole_lines(out: Path) -> None:
    """Every line of results.jsonl is a complete row: the file ends with a newline and nothing is invalid."""
    data = (out / RESULTS_FILE).read_bytes()
    assert data == b"" or data.endswith(b"\n")
    assert not read_results(out)[1]


# --- interrupts ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Interrupted:
    """A run stopped while its second configuration was in flight, as it was right after it exited."""

    out: Path
    code: int
    stderr: str
    survivors: list  # processes of the run still alive after it exited
    rows: list  # (dtype, status) in results.jsonl
    errors: list  # the rows' error messages


def interrupt_run(model: Path, out: Path, stop) -> Interrupted:
    process = start_cli(run_args(model, out), cwd=out.parent)
    wait_for(lambda: worker_starts(out) == 2 and spawned_workers(process.pid), "the second worker", process)
    assert statuses(out) == [("bf16", "ok")]  # the first configuration is finished, the second is in flight
    descendants = psutil.Process(process.pid).children(recursive=True)
    stop(process)
    _, stderr = process.communicate(timeout=WAIT_SECONDS)
    _, alive = psutil.wait_procs(descendants, timeout=10)
    rows, _ = read_results(out)
    return Interrupted(out, process.returncode, stderr, alive, statuses(out), [r.error for r in rows])


@pytest.fixture(scope="module")
def interrupted(tmp_path_factory, tiny_falcon_config) -> dict[str, Interrupted]:
    """Ctrl-C in a terminal (SIGINT to the whole process group: the worker gets it too) and `kill` (SIGTERM to
    the parent only)."""
    stops = {"SIGINT": lambda p: os.killpg(p.pid, signal.SIGINT), "SIGTERM": lambda p: p.send_signal(signal.SIGTERM)}
    return {name: interrupt_run(tiny_falcon_config, tmp_path_factory.mktemp(name.lower()) / "out", stop)
            for name, stop in stops.items()}


@pytest.mark.parametrize("how, reason", [("SIGINT", "by the user (Ctrl-C)"), ("SIGTERM", "by SIGTERM")])
def test_an_interrupt_keeps_finished_rows_and_ends_every_process(interrupted, how, reason):
    run = interrupted[how]
    assert run.code == 130, run.stderr
    assert run.rows == [("bf16", "ok"), ("fp16", "interrupted")]  # fp32 never started
    assert run.errors[1] == f"interrupted {reason}"
    assert_whole_lines(run.out)
    assert run.survivors == []
    assert f"Finished configurations are kept in {run.out}/results.jsonl" in run.stderr
    assert f"--output {run.out} --resume" in run.stderr
    assert "Traceback" not in run.stderr


def test_a_killed_sweep_takes_its_worker_with_it(tmp_path, tiny_falcon_config):
    """SIGKILL cannot be caught: the worker ends through PR_SET_PDEATHSIG, even when killed at its very start."""
    out = tmp_path / "out"
    process = start_cli(run_args(tiny_falcon_config, out), cwd=tmp_path)
    workers = wait_for(lambda: spawned_workers(process.pid), "the first worker", process)
    process.kill()
    process.communicate(timeout=WAIT_SECONDS)
    _, alive = psutil.wait_procs(workers, timeout=10)
    assert alive == []
    assert_whole_lines(out)


def copy_run(run: Interrupted, tmp_path: Path) -> Path:
    out = tmp_path / "out"
    shutil.copytree(run.out, out)
    return out


