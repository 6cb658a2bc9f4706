"""Issue 7: nothing finished is ever lost, no input crashes `run`, nothing runs that the user did not ask for.

Real `python -m falconbench run` processes are interrupted, their workers killed or starved, their output folder
filled or made unwritable, their model folders cut short; each ends in a clear status or one `Error:` line while
the finished rows stay whole. Spawned runs use the tiny random-weights Falcon and one thread each.
"""

from __future__ import annotations

import errno
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, replace
from pathlib import Path

import pytest
import psutil  # accelerate, which `run` needs, depends on it
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

pytest.importorskip("torch")
pytest.importorskip("transformers")

from falconbench import results as results_module  # noqa: E402
from falconbench.cli import cli  # noqa: E402
from falconbench.errors import ModelNotFoundError, ResultsError, RunError  # noqa: E402
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


def run_args(model: Path, out: Path, *extra: str, dtypes=DTYPES, random_weights: bool = True) -> list[str]:
    """`falconbench run` on `model` into `out` with the tiniest workload."""
    weights = ["--random-weights"] if random_weights else []
    return ["run", "-m", str(model), *weights, "-d", ",".join(dtypes), *TINY, "-o", str(out), *extra]


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


class Pipe:
    """Stands in for the worker's end of the pipe."""

    def __init__(self):
        self.sent = []

    def send(self, message):
        self.sent.append(message)

    def close(self):
        pass


class Exited(BaseException):
    """Raised by a stand-in for os._exit, so a worker function can be run inside the test process."""


# --- interrupts ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Interrupted:
    """A run stopped while its second configuration was in flight, as it was right after it exited."""

    out: Path
    code: int
    stderr: str
    survivors: list  # processes of the run still alive after it exited
    worker_blocked: set  # the signals the in-flight worker had blocked (so only the parent reacts to them)
    rows: list  # (dtype, status) in results.jsonl
    errors: list  # the rows' error messages


def blocked_signals(pid: int) -> set[signal.Signals]:
    """The signals process `pid` blocks (Linux: the SigBlk mask in /proc/PID/status)."""
    status = Path(f"/proc/{pid}/status").read_text()
    mask = int(re.search(r"^SigBlk:\s*([0-9a-f]+)$", status, re.M).group(1), 16)
    return {signal.Signals(n) for n in range(1, 32) if mask >> (n - 1) & 1}


def second_worker_running(out: Path, process: subprocess.Popen) -> bool:
    """The first configuration is finished and the second one's worker is running."""
    if process.poll() is not None:
        pytest.fail(f"the run ended (code {process.returncode}) before its second worker: {process.communicate()}")
    return worker_starts(out) == 2 and bool(spawned_workers(process.pid))


@pytest.fixture(scope="module")
def interrupted(tmp_path_factory, tiny_falcon_config) -> dict[str, Interrupted]:
    """Ctrl-C in a terminal (SIGINT to the whole process group: the worker gets it too) and `kill` (SIGTERM to
    the parent only), each sent while the second configuration is in flight; both runs go side by side."""
    stops = {"SIGINT": lambda p: os.killpg(p.pid, signal.SIGINT), "SIGTERM": lambda p: p.send_signal(signal.SIGTERM)}
    outs = {name: tmp_path_factory.mktemp(name.lower()) / "out" for name in stops}
    processes = {name: start_cli(run_args(tiny_falcon_config, out), cwd=out.parent) for name, out in outs.items()}
    descendants, blocked = {}, {}
    deadline = time.monotonic() + WAIT_SECONDS
    while len(descendants) < len(stops) and time.monotonic() < deadline:
        for name, process in processes.items():
            if name not in descendants and second_worker_running(outs[name], process):
                assert statuses(outs[name]) == [("bf16", "ok")]
                descendants[name] = psutil.Process(process.pid).children(recursive=True)
                blocked[name] = blocked_signals(spawned_workers(process.pid)[0].pid)
                stops[name](process)
        time.sleep(0.02)
    assert len(descendants) == len(stops), "timed out waiting for the second workers"
    runs = {}
    for name, process in processes.items():
        _, stderr = process.communicate(timeout=WAIT_SECONDS)
        _, alive = psutil.wait_procs(descendants[name], timeout=5)
        rows, _ = read_results(outs[name])
        runs[name] = Interrupted(outs[name], process.returncode, stderr, alive, blocked[name],
                                 statuses(outs[name]), [r.error for r in rows])
    return runs


@pytest.mark.parametrize("how, reason", [("SIGINT", "by the user (Ctrl-C)"), ("SIGTERM", "by SIGTERM")])
def test_an_interrupt_keeps_finished_rows_and_ends_every_process(interrupted, how, reason):
    run = interrupted[how]
    assert run.code == 130, run.stderr
    assert run.rows == [("bf16", "ok"), ("fp16", "interrupted")]  # fp32 never started
    assert run.errors[1] == f"interrupted {reason}"
    assert_whole_lines(run.out)
    assert run.survivors == []
    assert {signal.SIGINT, signal.SIGTERM, signal.SIGHUP} <= run.worker_blocked  # the parent alone stops a run
    assert f"Finished configurations are kept in {run.out}/results.jsonl" in run.stderr
    assert f"--output {run.out} --resume" in run.stderr
    assert "Traceback" not in run.stderr


def test_a_killed_sweep_takes_its_worker_with_it(tmp_path, tiny_falcon_config):
    """SIGKILL cannot be caught, yet the worker ends too, even when the sweep is killed at the worker's start."""
    out = tmp_path / "out"
    process = start_cli(run_args(tiny_falcon_config, out), cwd=tmp_path)
    wait_for(lambda: spawned_workers(process.pid), "the first worker", process)
    descendants = psutil.Process(process.pid).children(recursive=True)
    process.kill()
    process.communicate(timeout=WAIT_SECONDS)
    _, alive = psutil.wait_procs(descendants, timeout=10)
    assert alive == []
    assert_whole_lines(out)


ORPHAN = """
import os, sys, time
from falconbench.run import worker
if os.fork() == 0:
    if sys.argv[1] == "ask":
        worker.end_with_parent()
    print(os.getpid(), flush=True)  # ready: it has asked (or not)
    time.sleep(120)  # silent, as a worker is while it loads a large model: no message tells it the parent is gone
    os._exit(0)
time.sleep(120)
"""


@pytest.mark.parametrize("ask, survives", [("ask", False), ("do not ask", True)])
def test_a_worker_that_asked_ends_with_its_parent(ask, survives):
    """PR_SET_PDEATHSIG, shown on a forked child that is silent (a worker also ends when it next writes to its
    dead parent; this covers the silent stretch). The child that did not ask is the control."""
    with subprocess.Popen([sys.executable, "-c", ORPHAN, ask], stdout=subprocess.PIPE, text=True) as parent:
        child = psutil.Process(int(parent.stdout.readline()))
        parent.kill()
    # SIGKILL from the kernel lands at once; the control needs only a moment to show it lives on
    _, alive = psutil.wait_procs([child], timeout=1 if survives else 10)
    assert bool(alive) is survives
    for process in alive:
        process.kill()


def test_a_worker_whose_parent_died_before_it_asked_exits(monkeypatch):
    """The request only covers a parent that dies after it: the worker checks that its parent is still its own."""
    import ctypes
    import multiprocessing

    class Parent:
        pid = os.getppid() + 1  # not our parent any more: we were adopted

    def exit_(code):
        raise Exited(code)

    class LibC:  # prctl does nothing here: the test process must not ask to die with its own parent
        @staticmethod
        def prctl(*args):
            return 0

    monkeypatch.setattr(ctypes, "CDLL", lambda *args, **kwargs: LibC())
    monkeypatch.setattr(multiprocessing, "parent_process", lambda: Parent())
    monkeypatch.setattr(worker.os, "_exit", exit_)
    with pytest.raises(Exited):
        worker.end_with_parent()


def copy_run(run: Interrupted, tmp_path: Path) -> Path:
    out = tmp_path / "out"
    shutil.copytree(run.out, out)
    return out


def test_resume_finishes_the_rest_once_and_reports_a_corrupt_line(interrupted, tiny_falcon_config, tmp_path,
                                                                    monkeypatch):
    out = copy_run(interrupted["SIGTERM"], tmp_path)
    finished = (out / RESULTS_FILE).read_text().splitlines()[0]
    with open(out / RESULTS_FILE, "a") as results:
        results.write('{"model": "cut", "dtype": "bf')  # a line cut short (a crash, a copy): no newline
    reported = []

    def spy(path, data):
        reported.append(path.name)
        write_atomic(path, data)

    monkeypatch.setattr("falconbench.report.write_atomic", spy)
    result = CliRunner().invoke(cli, run_args(tiny_falcon_config, out, "--resume"), catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert worker_starts(out) == 2 + 2  # fp16 (interrupted) and fp32 (never started) ran; bf16 did not again
    assert "bf16 sdpa p4+2 b1: ok (already in the results file)" in result.output
    rows, problems = read_results(out)
    assert [(r.dtype, r.status) for r in rows] == [(d, "ok") for d in DTYPES]  # the interrupted row is gone
    assert len({r.config_hash for r in rows}) == len(DTYPES)
    assert (out / RESULTS_FILE).read_text().splitlines()[0] == finished  # kept byte for byte
    [problem] = problems  # the reason is whole: where the cut line stops, not a message cut short
    assert problem.line == 2 and re.fullmatch(r"not valid JSON \(Unterminated string starting at: column \d+\); "
                                              r"truncated write\?", problem.reason), problem.reason
    assert f"! skipped a line that is not a results row: {out / RESULTS_FILE}:2: not valid JSON" in result.output
    assert f"{out / RESULTS_FILE}:2: not valid JSON" in (out / "report.md").read_text()
    assert {"report.md", "report.csv", "report.html"} <= set(reported)  # each written whole, then renamed
    assert not list(out.glob(".*tmp*"))


@pytest.mark.parametrize("extra, model, message", [
    ([], "falcon", "already holds 2 row(s). Pass --resume to finish that run"),
    # NOTE: not --prompt-tokens: a repeated list option adds points to the matrix; --repeats replaces the value
    (["--resume", "--repeats", "2"], "falcon", "differs in repeats: 1 there, 2 now"),
    (["--resume"], "llama", "its model is "),
])
def test_resume_refuses_rows_of_another_run(interrupted, tiny_falcon_config, tiny_llama_config, tmp_path, extra,
                                            model, message):
    out = copy_run(interrupted["SIGINT"], tmp_path)
    before = (out / RESULTS_FILE).read_bytes()
    folder = tiny_falcon_config if model == "falcon" else tiny_llama_config
    result = CliRunner().invoke(cli, run_args(folder, out, *extra), catch_exceptions=False)
    assert result.exit_code == 2
    assert one_error_line(result.output) and message in result.output
    assert (out / RESULTS_FILE).read_bytes() == before and worker_starts(out) == 2


def one_error_line(output: str) -> bool:
    """The output holds exactly one `Error:` line and no traceback."""
    return sum(line.startswith("Error: ") for line in output.splitlines()) == 1 and "Traceback" not in output


# --- writes -------------------------------------------------------------------------------------------------


def row(dtype: str, status: str = "ok") -> RunResult:
    """A row named by the hash its own settings give, as every row `run` writes (a reader recomputes it)."""
    plain = RunResult(model="tiny", dtype=dtype, status=status)
    return replace(plain, config_hash=plain.expected_hash())


def test_a_row_appended_after_a_cut_short_line_starts_on_its_own_line(tmp_path):
    path = tmp_path / RESULTS_FILE
    append_result(path, row("bf16"))
    with open(path, "a") as handle:
        handle.write('{"model": "tiny", "dty')
    append_result(path, row("fp16"))
    rows, problems = read_results(path)
    assert [r.dtype for r in rows] == ["bf16", "fp16"]
    assert [p.line for p in problems] == [2] and str(problems[0]).startswith(f"{path}:2: not valid JSON")


def test_a_corrupt_line_is_reported_by_its_number_and_skipped_by_report(interrupted, tmp_path):
    out = copy_run(interrupted["SIGINT"], tmp_path)
    lines = (out / RESULTS_FILE).read_text().splitlines(keepends=True)
    (out / RESULTS_FILE).write_text(lines[0] + "\x00\x00garbage\n" + "[1, 2]\n" + "".join(lines[1:]))
    result = CliRunner().invoke(cli, ["report", str(out)], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert f"! invalid row skipped: {out / RESULTS_FILE}:2: not valid JSON" in result.output
    assert f"! invalid row skipped: {out / RESULTS_FILE}:3: not a results row: a row must be a JSON object" \
        in result.output
    assert [(r.dtype, r.status) for r in read_results(out)[0]] == [("bf16", "ok"), ("fp16", "interrupted")]


def test_a_report_that_cannot_be_written_leaves_the_results_as_they_are(interrupted, tiny_falcon_config, tmp_path):
    out = copy_run(interrupted["SIGINT"], tmp_path)
    (out / RESULTS_FILE).write_text((out / RESULTS_FILE).read_text().splitlines()[0] + "\n")  # bf16, done
    before = (out / RESULTS_FILE).read_bytes()
    (out / "report.md").mkdir()
    (out / "report.md" / "keep").write_text("a folder where the report should go")
    result = CliRunner().invoke(cli, run_args(tiny_falcon_config, out, "--resume", dtypes=["bf16"]),
                                catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert f"! The report could not be written: cannot write {out / 'report.md'}: Is a directory" in result.output
    assert "The results are intact" in result.output
    assert (out / RESULTS_FILE).read_bytes() == before
    assert not list(out.glob(".*tmp*"))


def test_write_atomic_leaves_no_temporary_file_on_failure(tmp_path, monkeypatch):
    target = tmp_path / "report.md"
    target.write_text("the previous report")

    def full_disk(descriptor):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(results_module.os, "fsync", full_disk)
    with pytest.raises(ResultsError, match="No space left on device"):
        write_atomic(target, b"the new report")
    assert target.read_text() == "the previous report"  # readers never see half a file
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.md"]
    monkeypatch.undo()
    write_atomic(target, b"the new report")
    assert target.read_text() == "the new report" and sorted(p.name for p in tmp_path.iterdir()) == ["report.md"]


def test_a_full_disk_stops_the_run_and_leaves_no_half_row(interrupted, tiny_falcon_config, tmp_path):
    """RLIMIT_FSIZE makes writes past a size fail (EFBIG) as a full disk would (ENOSPC): room for one row only."""
    row_bytes = len((interrupted["SIGINT"].out / RESULTS_FILE).read_text().splitlines()[0]) + 1
    limit = row_bytes * 3 // 2
    out = tmp_path / "out"
    process = start_cli(run_args(tiny_falcon_config, out, dtypes=["bf16", "fp16"]), cwd=tmp_path,
                        preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit)))
    _, stderr = process.communicate(timeout=WAIT_SECONDS)
    assert process.returncode == ResultsError.exit_code, stderr
    assert f"Error: cannot write {out / RESULTS_FILE}: File too large. Free some space" in stderr
    assert one_error_line(stderr)
    assert worker_starts(out) == 2 and statuses(out) == [("bf16", "ok")]
    assert_whole_lines(out)  # the second row was cut back off, not left half-written


# --- faults -------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def faulty_sweep(tmp_path_factory, tiny_falcon_dir, tiny_falcon_config):
    """Three configurations, two faults: real weights capped at 1 MiB past the imports (loading cannot allocate),
    a worker SIGKILLed from outside, and one untouched."""
    out = tmp_path_factory.mktemp("faults") / "out"
    small = dict(prompt_tokens=4, new_tokens=2, repeats=1, warmup=0)
    random = dict(random_weights=True, **small)
    configs = [RunConfig(str(tiny_falcon_dir), "bf16", memory_cap_bytes=2**20, **small),
               RunConfig(str(tiny_falcon_config), "fp16", **random),
               RunConfig(str(tiny_falcon_config), "fp32", **random)]
    killed = []

    def kill_second_worker():
        deadline = time.monotonic() + WAIT_SECONDS
        while time.monotonic() < deadline and not killed:
            if worker_starts(out) == 2:
                for process in spawned_workers(os.getpid()):
                    process.send_signal(signal.SIGKILL)
                    killed.append(process.pid)
            time.sleep(0.02)

    killer = threading.Thread(target=kill_second_worker, daemon=True)
    killer.start()
    rows = run_sweep(configs, out)
    killer.join()
    return rows, out, killed


def test_a_worker_out_of_memory_is_oom_and_keeps_its_plan(faulty_sweep):
    rows, _, _ = faulty_sweep
    assert rows[0].status == "oom", rows[0].error
    assert re.search(r"MemoryError|can't allocate memory|Cannot allocate memory", rows[0].error)  # torch, or mmap
    assert rows[0].planned_weights_bytes > 0


def test_a_killed_worker_is_an_error_row_and_the_sweep_goes_on(faulty_sweep):
    rows, out, killed = faulty_sweep
    assert len(killed) == 1
    assert rows[1].status == "error" and "the worker process was killed by SIGKILL" in rows[1].error
    assert rows[2].status == "ok"
    assert statuses(out) == [("bf16", "oom"), ("fp16", "error"), ("fp32", "ok")]
    assert_whole_lines(out)


def test_only_a_capped_worker_that_crashes_counts_as_out_of_memory(tmp_path):
    """Under RLIMIT_AS native code may crash instead of raising (the tiny random-weights Falcon segfaults in its
    first forward on CPU); that death reads oom only when a cap was set."""
    log = tmp_path / "worker.log"
    assert orchestrator.death_status(-signal.SIGSEGV, 2**20) == "oom"
    assert "at its --memory-cap of 1,048,576 bytes" in orchestrator.death_message(-signal.SIGSEGV, log, 2**20)
    assert orchestrator.death_status(-signal.SIGSEGV, None) == "error"
    assert orchestrator.death_status(-signal.SIGKILL, 2**20) == "error"  # killed from outside, cap or not
    assert orchestrator.death_status(1, 2**20) == "error"


def capture_sweeps(monkeypatch) -> list:
    """Stand in for the sweep: record the configurations `run` would measure, start no worker."""
    calls = []

    def sweep(configs, output_dir, *args, **kwargs):
        calls.append((list(configs), Path(output_dir)))
        orchestrator.prepare_output(output_dir)
        return []

    monkeypatch.setattr(orchestrator, "run_sweep", sweep)
    return calls


def test_the_memory_cap_reaches_every_configuration(tiny_falcon_config, tmp_path, monkeypatch):
    calls = capture_sweeps(monkeypatch)
    result = CliRunner().invoke(cli, run_args(tiny_falcon_config, tmp_path / "out", "--memory-cap", "1.5GiB"))
    assert result.exit_code == 0, result.output
    assert [c.memory_cap_bytes for c in calls[0][0]] == [3 * 2**29] * len(DTYPES)


def no_worker_may_start(monkeypatch) -> None:
    def refuse(*args, **kwargs):
        raise AssertionError("a worker was started")

    monkeypatch.setattr(orchestrator, "run_isolated", refuse)


@pytest.mark.parametrize("blocked", ["a file where the folder should be", "results.jsonl is a folder"])
def test_an_output_folder_that_refuses_writes_is_one_clear_error(tiny_falcon_config, tmp_path, monkeypatch,
                                                                 blocked):
    no_worker_may_start(monkeypatch)
    if blocked.startswith("a file"):
        (tmp_path / "file").write_text("not a folder")
        out, reason = tmp_path / "file" / "out", "Not a directory"
    else:
        out, reason = tmp_path / "out", "Is a directory"
        (out / RESULTS_FILE).mkdir(parents=True)
    result = CliRunner().invoke(cli, run_args(tiny_falcon_config, out), catch_exceptions=False)
    assert result.exit_code == RunError.exit_code
    assert one_error_line(result.output)
    assert f"Error: cannot write results into {out}: {reason}. Choose another --output" in result.output


@pytest.fixture
def model_copy(tiny_falcon_dir, tmp_path) -> Path:
    folder = tmp_path / "model"
    shutil.copytree(tiny_falcon_dir, folder)
    return folder


@pytest.mark.parametrize("keep", ["half", "8 bytes"])
def test_a_half_written_model_is_refused_before_any_worker(model_copy, tmp_path, monkeypatch, keep):
    no_worker_may_start(monkeypatch)
    weights = model_copy / "model.safetensors"
    full = weights.stat().st_size
    cut = full // 2 if keep == "half" else 8
    with open(weights, "r+b") as handle:
        handle.truncate(cut)
    out = tmp_path / "out"
    result = CliRunner().invoke(cli, run_args(model_copy, out, random_weights=False), catch_exceptions=False)
    assert result.exit_code == RunError.exit_code and one_error_line(result.output)
    if keep == "half":
        assert f"Error: {weights} is truncated: {cut:,} of {full:,} bytes. The download or copy did not finish" \
            in result.output
    else:
        assert f"Error: {weights} is not a safetensors file, or its header is cut short (8 bytes)" in result.output
    assert not out.exists()


@pytest.mark.parametrize("damage, message, code", [
    ("missing folder", "Error: {model}: no such file or folder", ModelNotFoundError.exit_code),
    ("no config.json", "Error: {model} is a folder without a config.json", ModelNotFoundError.exit_code),
    ("no weights", "Error: model: no safetensors weights in {model}. Pass --random-weights", RunError.exit_code),
])
def test_a_missing_model_is_one_clear_error(model_copy, tmp_path, monkeypatch, damage, message, code):
    no_worker_may_start(monkeypatch)
    if damage == "missing folder":
        shutil.rmtree(model_copy)
    else:
        (model_copy / ("config.json" if damage == "no config.json" else "model.safetensors")).unlink()
    result = CliRunner().invoke(cli, run_args(model_copy, tmp_path / "out", random_weights=False),
                                catch_exceptions=False)
    assert result.exit_code == code and one_error_line(result.output)
    assert message.format(model=model_copy) in result.output


# --- fuzzing: values `run` must refuse before any worker starts ---------------------------------------------


def invalid_dtypes(text: str) -> bool:
    """Whether `text` as --dtype names a scheme that does not exist, or one twice (in any case: the same name
    twice is taken once)."""
    names = [name.lower() for name in dict.fromkeys(part.strip() for part in text.split(",") if part.strip())]
    return bool(names) and (any(name not in SCHEMES for name in names) or len(set(names)) < len(names))


not_an_int = st.sampled_from(["", " ", "x", "1.5", "1e3", "0x10", "1_0_"])
not_positive = st.one_of(st.integers(max_value=0).map(str), not_an_int)
BAD_VALUES = {
    "--dtype": st.one_of(st.sampled_from(["bf8", "int4", "fp64", "q4_0", "nf4,NF4", "bf16, Bf16", "b f16"]),
                         st.text(max_size=12).filter(invalid_dtypes)),
    "--prompt-tokens": not_positive, "--new-tokens": not_positive, "--repeats": not_positive,
    "--batch": not_positive, "--warmup": st.one_of(st.integers(max_value=-1).map(str), not_an_int),
    "--memory-cap": st.one_of(st.sampled_from(["", "0", "0.5", "-1G", "G", "1X", "nan", "inf", "1e400", "1.2.3M"]),
                              st.text("abcfinty-_. KMGTB", max_size=6)),  # no digit: never a size
    "--window": st.integers(max_value=512).map(str),  # < 2, or not above the default stride (512)
    "--stride": st.one_of(st.integers(max_value=0), st.integers(min_value=1024)).map(str),  # default window 1024
    "--eval-tokens": st.integers(max_value=1).map(str),
    "--int8-threshold": st.sampled_from(["-1", "-0.5", "nan", "inf", "-inf", "x"]),
    "--reference": st.text(max_size=8).filter(lambda t: t.strip().lower() not in SCHEMES),
    "--device": st.text(max_size=6).filter(lambda t: t not in ("auto", "cpu", "cuda")),
}
bad_options = st.lists(st.sampled_from(sorted(BAD_VALUES)).flatmap(lambda o: BAD_VALUES[o].map(lambda v: (o, v))),
                       min_size=1, max_size=3, unique_by=lambda pair: pair[0])


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(bad_options, st.sampled_from([[], ["--random-weights"], ["--no-quality"]]))
def test_invalid_run_values_fail_before_any_worker(tiny_falcon_dir, tmp_path, options, quality_off):
    """Also with quality off: a mistyped --window is refused, not silently ignored."""
    out = tmp_path / "never-created"
    args = ["run", "-m", str(tiny_falcon_dir), "--device", "cpu", "-o", str(out), *quality_off]
    args += [token for option, value in options for token in (option, value)]
    with pytest.MonkeyPatch.context() as patch:
        no_worker_may_start(patch)
        result = CliRunner().invoke(cli, args)
    assert result.exception is None or isinstance(result.exception, SystemExit), (args, result.exception)
    assert result.exit_code == 2, (args, result.output)
    assert one_error_line(result.output), (args, result.output)
    assert not out.exists()


def test_scheme_names_in_any_case_are_one_configuration(tiny_falcon_dir, tmp_path, monkeypatch):
    calls = capture_sweeps(monkeypatch)
    result = CliRunner().invoke(cli, run_args(tiny_falcon_dir, tmp_path / "out", "--reference", "BF16",
                                              dtypes=["FP16", "bf16"], random_weights=False))
    assert result.exit_code == 0, result.output
    assert [(c.dtype, c.reference, c.quality) for c in calls[0][0]] == [("bf16", "bf16", True), ("fp16", "bf16", True)]


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=300))
def test_any_model_name_makes_one_safe_folder_name(name):
    safe = sanitize(name)
    assert re.fullmatch(r"[A-Za-z0-9_]([A-Za-z0-9._-]*[A-Za-z0-9_])?", safe), safe
    assert len(safe) <= 100
    folder = default_output_dir(name, root=Path("reports"))
    assert folder.parent == Path("reports") and folder.name.startswith(safe + "-")


# --- security defaults --------------------------------------------------------------------------------------


@pytest.mark.parametrize("name, expected", [
    ("tiiuae/falcon-7b", "tiiuae-falcon-7b"), ("../../etc", "etc"), ("a/b", "a-b"), ("..", "model"),
    (".hidden", "hidden"), ("模型", "model"), ("façade/模型-7b", "fa-ade--7b"), ("x" * 300, "x" * 100),
    ("a\x00b\nc", "a-b-c"), ("/abs/path/", "abs-path"),
])
def test_file_names_from_model_names_are_sanitized(tmp_path, name, expected):
    assert sanitize(name) == expected
    folder = default_output_dir(name, root=tmp_path)
    folder.mkdir()
    assert folder.parent == tmp_path


def test_the_default_output_folder_is_named_from_the_sanitized_model_name(tmp_path, monkeypatch):
    model = write_config(tmp_path / "évil name;rm -rf", TINY_FALCON)
    calls = capture_sweeps(monkeypatch)
    monkeypatch.chdir(tmp_path)
    assert CliRunner().invoke(cli, ["run", "-m", str(model), "--random-weights", "-d", "bf16", "--device", "cpu"]).exit_code == 0
    folder = calls[0][1]
    assert folder.parent == Path("reports") and re.fullmatch(r"vil-name-rm--rf-\d{8}-\d{6}", folder.name)


def test_remote_code_is_off_unless_asked_for_and_then_loudly_on(tiny_falcon_config, tmp_path, monkeypatch):
    assert RunConfig("falcon-7b", "bf16").trust_remote_code is False
    calls = capture_sweeps(monkeypatch)
    quiet = CliRunner().invoke(cli, run_args(tiny_falcon_config, tmp_path / "a"))
    loud = CliRunner().invoke(cli, run_args(tiny_falcon_config, tmp_path / "b", "--trust-remote-code"))
    assert quiet.exit_code == loud.exit_code == 0
    assert "WARNING" not in quiet.output
    assert "WARNING: --trust-remote-code runs Python code that came with the model" in loud.output
    assert [c.trust_remote_code for c in calls[0][0]] == [False] * 3
    assert [c.trust_remote_code for c in calls[1][0]] == [True] * 3
    assert orchestrator.planned_row(calls[0][0][0]).settings["trust_remote_code"] is False


def test_the_loader_asks_for_safetensors_and_no_remote_code(tiny_falcon_dir, monkeypatch):
    from transformers import AutoModelForCausalLM

    from falconbench.run import loading
    from falconbench.sources import resolve_model

    asked = []

    def from_pretrained(folder, **kwargs):
        asked.append(kwargs)
        raise RuntimeError("stop here")

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", from_pretrained)
    source = resolve_model(str(tiny_falcon_dir))
    for allow_pickle in (False, True):
        with pytest.raises(RuntimeError, match="stop here"):
            loading.load_pretrained(RunConfig(str(tiny_falcon_dir), "bf16", allow_pickle=allow_pickle), source,
                                    lambda: None)
    assert [(a["use_safetensors"], a["trust_remote_code"]) for a in asked] == [(True, False), (None, False)]


@pytest.fixture
def pickle_only_model(tiny_falcon_dir, tmp_path) -> Path:
    """The tiny Falcon with its weights in pytorch_model.bin (a torch.save pickle) and no safetensors."""
    import torch
    from safetensors.torch import load_file

    folder = tmp_path / "pickled"
    folder.mkdir()
    shutil.copy(tiny_falcon_dir / "config.json", folder / "config.json")
    torch.save(load_file(tiny_falcon_dir / "model.safetensors"), folder / "pytorch_model.bin")
    return folder


def test_pickle_weights_are_refused_unless_allowed(pickle_only_model, tmp_path, monkeypatch):
    calls = capture_sweeps(monkeypatch)
    args = run_args(pickle_only_model, tmp_path / "out", random_weights=False)
    refused = CliRunner().invoke(cli, args)
    assert refused.exit_code == RunError.exit_code and one_error_line(refused.output)
    assert ("holds only pickle-based weights (pytorch_model.bin), and loading them can run code from the file. "
            "Convert them to safetensors, or pass --allow-pickle") in refused.output
    assert calls == []
    allowed = CliRunner().invoke(cli, [*args, "--allow-pickle"])
    assert allowed.exit_code == 0, allowed.output
    assert [c.allow_pickle for c in calls[0][0]] == [True] * 3


def test_the_loader_itself_refuses_pickle_weights_unless_allowed(pickle_only_model):
    """A second line of defence: transformers is told safetensors only, so it never unpickles."""
    from falconbench.run import loading
    from falconbench.sources import resolve_model

    source = resolve_model(str(pickle_only_model))
    with pytest.raises(OSError, match="safetensors"):
        loading.load_pretrained(RunConfig(str(pickle_only_model), "bf16"), source, lambda: None)
    loaded = loading.load_pretrained(RunConfig(str(pickle_only_model), "bf16", allow_pickle=True), source,
                                     lambda: None)
    assert loaded.model.config.model_type == "falcon"


@pytest.mark.parametrize("allow_downloads, offline", [(False, "1"), (True, None)])
def test_the_worker_is_offline_unless_downloads_are_allowed(monkeypatch, allow_downloads, offline):
    seen = {}
    offline_names = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
    # a copy of the environment, so what child_main sets stays in this test
    monkeypatch.setattr(os, "environ", {k: v for k, v in os.environ.items() if k not in offline_names})

    def measure(points, emit, output_dir=None, bandwidth=None):
        seen.update(hub=os.environ.get("HF_HUB_OFFLINE"), transformers=os.environ.get("TRANSFORMERS_OFFLINE"))

    def exit_(code):
        raise Exited(code)

    monkeypatch.setattr(worker, "measure_load", measure)
    monkeypatch.setattr(worker, "end_with_parent", lambda: None)
    monkeypatch.setattr(worker.os, "_exit", exit_)
    pipe = Pipe()
    with pytest.raises(Exited):
        worker.child_main([RunConfig("falcon-7b", "bf16", allow_downloads=allow_downloads).as_dict()], pipe)
    assert seen == {"hub": offline, "transformers": offline}
    assert not [m for m in pipe.sent if m["kind"] == "failed"]


def test_the_worker_sets_offline_before_any_hugging_face_import():
    """huggingface_hub reads HF_HUB_OFFLINE once, when imported: the worker module must not import it."""
    probe = ("import sys, falconbench.run.worker; "
             "print(sorted(m for m in ('huggingface_hub', 'transformers', 'torch') if m in sys.modules))")
    output = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout
    assert output.strip() == "[]"


@pytest.fixture
def hub_cache(tmp_path, monkeypatch, tiny_falcon_dir):
    """An empty Hugging Face cache, and a stand-in for snapshot_download that fills it as the hub would."""
    import huggingface_hub

    cache = tmp_path / "hub"
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    calls = []

    def snapshot_download(repo_id, cache_dir=None, allow_patterns=None, **kwargs):
        calls.append({"repo_id": repo_id, "cache_dir": cache_dir, "allow_patterns": allow_patterns, **kwargs})
        repo = Path(cache_dir) / ("models--" + repo_id.replace("/", "--"))
        snapshot = repo / "snapshots" / "0123abc"
        snapshot.mkdir(parents=True)
        for file in tiny_falcon_dir.iterdir():
            if any(Path(file.name).match(pattern) for pattern in allow_patterns):
                shutil.copy(file, snapshot / file.name)
        (repo / "refs").mkdir()
        (repo / "refs" / "main").write_text("0123abc")
        return str(snapshot)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    return calls


def test_a_hub_id_not_in_the_cache_is_refused_offline(hub_cache, tmp_path, monkeypatch):
    capture_sweeps(monkeypatch)
    result = CliRunner().invoke(cli, ["run", "-m", "someone/tiny-falcon", "-d", "bf16", "--device", "cpu", "-o", str(tmp_path / "o")])
    assert result.exit_code == ModelNotFoundError.exit_code and one_error_line(result.output)
    assert "someone/tiny-falcon is not in the local Hugging Face cache" in result.output
    assert "Pass --allow-downloads to fetch its config, safetensors weights and tokenizer" in result.output
    assert hub_cache == []


@pytest.mark.parametrize("flags, fetched, not_fetched", [
    ([], ["config.json", "*.safetensors", "tokenizer*"], ["*.bin", "*.py"]),
    (["--random-weights"], ["config.json"], ["*.safetensors", "*.bin", "*.py"]),
    (["--allow-pickle", "--trust-remote-code"], ["*.safetensors", "*.bin", "*.py"], []),
])
def test_allow_downloads_fetches_only_what_the_run_reads(hub_cache, tmp_path, monkeypatch, flags, fetched,
                                                        not_fetched):
    calls = capture_sweeps(monkeypatch)
    result = CliRunner().invoke(cli, ["run", "-m", "someone/tiny-falcon", "-d", "bf16", "--device", "cpu", "--allow-downloads",
                                      *flags, "-o", str(tmp_path / "o")])
    assert result.exit_code == 0, result.output
    [download] = hub_cache
    assert download["repo_id"] == "someone/tiny-falcon" and download["cache_dir"] == str(tmp_path / "hub")
    assert set(fetched) <= set(download["allow_patterns"])
    assert not set(not_fetched) & set(download["allow_patterns"])
    configs = calls[0][0]  # bf16, and the fp32 quality reference where the weights are real
    assert "bf16" in {c.dtype for c in configs}
    assert all(c.model == "someone/tiny-falcon" and c.allow_downloads for c in configs)


def test_a_failed_download_is_one_clear_error(hub_cache, tmp_path, monkeypatch):
    import huggingface_hub
    from huggingface_hub.errors import OfflineModeIsEnabled

    def offline(*args, **kwargs):
        raise OfflineModeIsEnabled("Cannot reach https://huggingface.co: offline mode is enabled.")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    result = CliRunner().invoke(cli, ["run", "-m", "someone/tiny-falcon", "-d", "bf16", "--device", "cpu", "--allow-downloads",
                                      "-o", str(tmp_path / "o")])
    assert result.exit_code == ModelNotFoundError.exit_code and one_error_line(result.output)
    assert "Error: could not download someone/tiny-falcon from the Hugging Face hub (Cannot reach" in result.output


def test_each_row_is_synced_as_one_whole_line(tmp_path, monkeypatch):
    """append_result ends each row with its newline and fsyncs it before returning."""
    synced = []
    real_fsync = results_module.os.fsync
    monkeypatch.setattr(results_module.os, "fsync", lambda fd: (synced.append(fd), real_fsync(fd)))
    path = tmp_path / RESULTS_FILE
    append_result(path, row("bf16"))
    append_result(path, row("nf4", "oom"))
    lines = path.read_text().splitlines(keepends=True)
    assert len(synced) == 2 and len(lines) == 2 and all(line.endswith("}\n") for line in lines)
    rows, problems = read_results(path)
    assert not problems and [r.status for r in rows] == ["ok", "oom"]


def test_an_fp32_reference_is_stored_in_float32():
    assert RunConfig("m", "bf16", quality=True, reference="fp32").quality_spec().logprob_dtype == "float32"
    assert RunConfig("m", "bf16", quality=True).quality_spec().logprob_dtype == "float16"
