"""Issue 11: one writer per run folder, rows that can't crash a reader or be forged, signals at any moment, every
bad value refused up front, plan and fit bounded at any scale.

Each test is one reproduction of the issue, written from its command. Spawned runs use the tiny random-weights
Falcon, one thread each; the reference corruptions are in test_quality.py and test_run_quality.py (they need the
real SmolLM2).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

pytest.importorskip("torch")

from falconbench import __version__, fit, plan  # noqa: E402
from falconbench.calibrate import read_calibration  # noqa: E402
from falconbench.cli import cli  # noqa: E402
from falconbench.errors import ConfigError, FalconbenchError, FolderBusyError, ResultsError, RunError  # noqa: E402
from falconbench.fit import expand, pack  # noqa: E402
from falconbench.report import load_comparison  # noqa: E402
from falconbench.results import MAX_LINE_BYTES, RESULTS_FILE, SCHEMA_VERSION, read_results  # noqa: E402
from falconbench.run import RunConfig, orchestrator  # noqa: E402
from falconbench.run import signals as run_signals  # noqa: E402
from falconbench.run.rundir import hold_run_folder, reference_unusable, resume_rows  # noqa: E402
from falconbench.sources import resolve_model  # noqa: E402
from tiny_models import TINY_FALCON, TINY_LLAMA, write_config  # noqa: E402
from test_reliability import TINY, WAIT_SECONDS, run_args, start_cli, wait_for, worker_starts  # noqa: E402

pytestmark = pytest.mark.slow
HANG_SECONDS = 60  # a bound that only a hang reaches (the cores are shared); speed is in benchmarks/


@pytest.fixture(scope="module", autouse=True)
def one_thread_per_worker():
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("OMP_NUM_THREADS", "1")
        yield


def invoke(*args: str):
    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)


@pytest.fixture(scope="module")
def finished(tmp_path_factory, tiny_falcon_config) -> Path:
    """A finished two-configuration run of the tiny Falcon (bf16, fp16), its report written."""
    out = tmp_path_factory.mktemp("finished") / "run"
    result = invoke(*run_args(tiny_falcon_config, out, dtypes=["bf16", "fp16"]))
    assert result.exit_code == 0, result.output
    return out


def copy_run(run: Path, tmp_path: Path) -> Path:
    target = tmp_path / "copy"
    shutil.copytree(run, target)
    return target


# --- one writer per folder ----------------------------------------------------------------------------------


def test_two_runs_started_together_on_one_folder_leave_one_row_per_configuration(tiny_falcon_config, tmp_path):
    """Issue: two `run ... -o D --resume` started together both exited 0 with two final rows per configuration."""
    out = tmp_path / "run"
    args = run_args(tiny_falcon_config, out, "--resume", dtypes=["bf16", "fp16"])
    first, second = start_cli(args, tmp_path), start_cli(args, tmp_path)
    outputs = [p.communicate(timeout=WAIT_SECONDS * 2) for p in (first, second)]
    codes = sorted(p.returncode for p in (first, second))
    assert codes == [0, RunError.exit_code], outputs  # the folder is busy
    refused = next(err for (_, err), p in zip(outputs, (first, second)) if p.returncode == RunError.exit_code)
    holder = next(p.pid for p in (first, second) if p.returncode == 0)
    assert f"is in use by another falconbench run (process {holder})" in refused
    rows, problems = read_results(out)
    assert not problems and sorted(row.dtype for row in rows) == ["bf16", "fp16"]


def test_a_second_run_is_refused_while_the_first_works_and_a_killed_ones_lock_never_blocks(tiny_falcon_config,
                                                                                           tmp_path):
    """Issue: without --resume, a second run started 3 s after the first also wrote its rows."""
    out = tmp_path / "run"
    first = start_cli(run_args(tiny_falcon_config, out, dtypes=["bf16", "fp16"]), tmp_path)
    wait_for(lambda: worker_starts(out) >= 1, "the first run's worker", first)
    second = start_cli(run_args(tiny_falcon_config, out, dtypes=["bf16", "fp16"]), tmp_path)
    _, err = second.communicate(timeout=WAIT_SECONDS)
    assert second.returncode == RunError.exit_code and err.strip() == (
        f"Error: {out} is in use by another falconbench run (process {first.pid}). Wait for it to finish, or "
        "choose another --output")
    os.kill(first.pid, signal.SIGKILL)  # its lock goes with it
    first.communicate(timeout=WAIT_SECONDS)
    resumed = invoke(*run_args(tiny_falcon_config, out, "--resume", dtypes=["bf16", "fp16"]))
    assert resumed.exit_code == 0, resumed.output
    rows, problems = read_results(out)
    assert not problems and sorted(row.dtype for row in rows) == ["bf16", "fp16"]


def test_the_lock_names_its_holder_and_dies_with_it(tmp_path):
    """The rewrite of results.jsonl (resume dropping rows) happens only under this lock."""
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from falconbench.run.rundir import "
                               "hold_run_folder as h\nwith h(sys.argv[1]):\n print('held', flush=True); "
                               "time.sleep(600)", str(tmp_path)], stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])})
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(FolderBusyError, match=rf"in use by another falconbench run \(process {holder.pid}\)"):
            with hold_run_folder(tmp_path):
                pass
    finally:
        holder.kill()
        holder.wait()
    with hold_run_folder(tmp_path):
        with hold_run_folder(tmp_path):  # the same process nests (a run, then its report)
            pass


def test_stale_temporary_files_are_removed_at_start(tmp_path):
    """Issue: each kill during the reference write left a 25 MB .reference-*.tmp-PID behind."""
    names = [".reference-0123.safetensors.tmp-4242", ".report.md.4242.deadbeef.tmp", "results.jsonl", "keep.tmp"]
    for name in names:
        (tmp_path / name).write_text("x")
    with hold_run_folder(tmp_path):
        pass
    assert sorted(p.name for p in tmp_path.iterdir() if p.name != ".falconbench.lock") == ["keep.tmp",
                                                                                           "results.jsonl"]


# --- rows that can't crash a reader ------------------------------------------------------------------------

BAD_LINES = {
    "deep nesting": "[" * 100000 + "]" * 100000,
    "unhashable hash": {"config_hash": ["x"]},
    "settings not an object": {"settings": "abc"},
    "model null, dtype 5": {"model": None, "dtype": 5},
}


def bad_line(run: Path, case: str) -> str:
    value = BAD_LINES[case]
    if isinstance(value, str):
        return value
    row = json.loads((run / RESULTS_FILE).read_text().splitlines()[0])
    return json.dumps({**row, **value})


@pytest.mark.parametrize("case", list(BAD_LINES))
@pytest.mark.parametrize("command", ["report", "run --resume", "fit --calibrate"])
def test_one_bad_line_is_named_and_skipped_by_every_reader(finished, tiny_falcon_config, tmp_path, case, command):
    """Issue: each of these lines ended report, run --resume and fit --calibrate with exit 1 and a traceback's
    name (RecursionError, TypeError, AttributeError, NotRenderableError)."""
    run = copy_run(finished, tmp_path)
    with open(run / RESULTS_FILE, "a") as handle:
        handle.write(bad_line(run, case) + "\n")
    if command == "report":
        result = invoke("report", run)
    elif command == "run --resume":
        result = invoke(*run_args(tiny_falcon_config, run, "--resume", dtypes=["bf16", "fp16"]))
    else:
        result = invoke("fit", "-m", tiny_falcon_config, "--calibrate", run)
    assert result.exit_code == 0, result.output
    assert f"results.jsonl:3: not" in result.output and "unexpected" not in result.output


ROW_FIELDS = ["model", "dtype", "status", "config_hash", "error", "device", "settings", "environment",
              "weights_bytes", "peak_memory_bytes", "memory", "latency", "ttft_seconds", "perplexity", "quality",
              "schema", "timestamp", "falconbench_version"]
JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=5),
                    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=3), inner,
                                                                                max_size=3), max_leaves=8)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(field=st.sampled_from(ROW_FIELDS), value=JSON)
def test_any_json_in_any_field_is_a_row_or_a_named_skip(finished, tmp_path_factory, field, value):
    run = tmp_path_factory.mktemp("fuzz")
    row = json.loads((finished / RESULTS_FILE).read_text().splitlines()[0])
    (run / RESULTS_FILE).write_text(json.dumps({**row, field: value}) + "\n")
    rows, problems = read_results(run)
    assert len(rows) + len(problems) == 1
    spec = resolve_model(str(finished / "config.json")).spec()
    for read in (lambda: load_comparison([run]), lambda: read_calibration(str(run), spec, ["bf16"])):
        try:
            read()
        except FalconbenchError:  # e.g. "no valid results row": one Error: line; any other exception fails
            pass


def test_long_lines_and_files_that_are_not_regular_are_refused(finished, tmp_path):
    """Issue: results.jsonl linked to /dev/zero, `report /dev/zero` and `fit --calibrate /dev/zero` read without
    bound; `report` on a FIFO hung."""
    run = copy_run(finished, tmp_path)
    with open(run / RESULTS_FILE, "ab") as handle:
        handle.write(b"x" * (MAX_LINE_BYTES + 10) + b"\n")
    rows, problems = read_results(run)
    assert len(rows) == 2 and [str(p).split(": ", 1)[1] for p in problems] == [
        "longer than 1 MiB; not a results row"]
    zero = tmp_path / "zero"
    zero.mkdir()
    (zero / RESULTS_FILE).symlink_to("/dev/zero")
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    for args in (["report", zero], ["report", "/dev/zero"], ["fit", "-m", "falcon-7b", "--calibrate", "/dev/zero"],
                 ["report", fifo]):
        done = subprocess.run([sys.executable, "-m", "falconbench", *map(str, args)], capture_output=True,
                              text=True, timeout=HANG_SECONDS, cwd=tmp_path)
        assert done.returncode == ResultsError.exit_code and "is not a regular file" in done.stderr, (args, done.stderr)


# --- rows that can't be forged -----------------------------------------------------------------------------


def test_an_edited_row_is_skipped_by_name_and_runs_again(finished, tiny_falcon_config, tmp_path):
    """Issue: a row edited to `repeats: 99, prompt_tokens: 4096` with its hash kept was accepted as done."""
    run = copy_run(finished, tmp_path)
    lines = (run / RESULTS_FILE).read_text().splitlines()
    row = json.loads(lines[1])
    row["settings"].update(repeats=99, prompt_tokens=4096)
    (run / RESULTS_FILE).write_text(lines[0] + "\n" + json.dumps(row) + "\n")
    rows, problems = read_results(run)
    assert [r.dtype for r in rows] == ["bf16"] and len(problems) == 1
    assert re.fullmatch(rf".*results.jsonl:2: not a results row: its fp16 settings hash to [0-9a-f]{{16}}, not to "
                        rf"its config_hash {row['config_hash']}: the row was edited", str(problems[0]))


def test_a_row_given_another_configurations_hash_does_not_stand_for_it(finished, tiny_falcon_config):
    """Issue: a bf16 row given fp16's hash made resume skip fp16."""
    rows, _ = read_results(finished)
    planned = [orchestrator.planned_row(RunConfig(str(tiny_falcon_config), d, random_weights=True,
                                                  **tiny_settings())) for d in ("bf16", "fp16")]
    assert [r.config_hash for r in planned] == [r.config_hash for r in rows]
    forged = finished.parent / "forged"
    forged.mkdir(exist_ok=True)
    bf16 = json.loads((finished / RESULTS_FILE).read_text().splitlines()[0])
    (forged / RESULTS_FILE).write_text(json.dumps({**bf16, "config_hash": rows[1].config_hash}) + "\n")
    with hold_run_folder(forged):
        assert resume_rows(forged / RESULTS_FILE, planned, resume=True) == {}


def tiny_settings() -> dict:
    values = dict(zip(TINY[2::2], TINY[3::2]))
    return {name.lstrip("-").replace("-", "_"): int(value) for name, value in values.items()}


def test_rows_record_falconbench_version_and_an_unknown_schema_is_skipped(finished, tmp_path):
    rows, _ = read_results(finished)
    assert {(r.falconbench_version, r.schema) for r in rows} == {(__version__, SCHEMA_VERSION)}
    run = copy_run(finished, tmp_path)
    row = json.loads((run / RESULTS_FILE).read_text().splitlines()[0])
    (run / RESULTS_FILE).write_text(json.dumps({**row, "schema": 99}) + "\n")
    assert "schema 99 is not one this falconbench reads" in read_results(run)[1][0].reason


def test_a_reference_row_without_a_verified_reference_is_not_done(tmp_path):
    """Issue: a full disk during the reference write lost quality for that folder for good (resume counted the
    reference row as done)."""
    import torch

    from falconbench.quality.reference import write_reference
    from falconbench.results import RunResult

    settings_ = {"quality": {"reference": "bf16"}, "model_source": {"weights_fingerprint": "abc"}}
    failed = RunResult("m", "bf16", "ok", settings=settings_, quality={"skipped": "quality not measured: disk full"})
    assert reference_unusable(failed, tmp_path) == "its quality was not measured, so no reference was stored"
    path = tmp_path / "reference-0001.safetensors"
    write_reference(path, {"token_ids": torch.arange(4)}, {"reference": "bf16", "weights": "abc"})
    stored = RunResult("m", "bf16", "ok", settings=settings_, quality={"reference_file": path.name})
    assert reference_unusable(stored, tmp_path) is None
    other = RunResult("m", "bf16", "ok", settings={**settings_, "model_source": {"weights_fingerprint": "def"}},
                      quality={"reference_file": path.name})
    assert reference_unusable(other, tmp_path) == "its weights is 'abc', this run's is 'def'"
    data = path.read_bytes()
    path.write_bytes(data[:-1] + bytes([data[-1] ^ 0xFF]))
    assert "SHA-256 differs" in reference_unusable(stored, tmp_path)
    fp16 = RunResult("m", "fp16", "ok", settings=settings_, quality={"skipped": "x"})
    assert reference_unusable(fp16, tmp_path) is None  # only the reference scheme's row is held back


# --- signals at any moment ----------------------------------------------------------------------------------


@pytest.mark.parametrize("how", [signal.SIGTERM, signal.SIGINT])
@pytest.mark.parametrize("target", ["report.md", "latency.png"])
def test_a_signal_while_the_report_is_written_is_an_interrupt(finished, tiny_falcon_config, tmp_path, monkeypatch,
                                                              how, target):
    """Issue: SIGTERM there exited 143 without the Interrupted line and left .report.md.<pid>.<hex>.tmp; SIGINT
    left .latency.png.<pid>.<hex>.tmp."""
    run = copy_run(finished, tmp_path)
    real_fsync = os.fsync

    def fsync_then_signal(descriptor):  # the temporary file exists and is half done when the signal comes
        real_fsync(descriptor)
        if any(p.name.startswith(f".{target}.") for p in run.iterdir()):
            os.kill(os.getpid(), how)
            time.sleep(0.5)  # the handler runs at the next instruction; this sleep is never finished

    monkeypatch.setattr(os, "fsync", fsync_then_signal)
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    result = invoke(*run_args(tiny_falcon_config, run, "--resume", dtypes=["bf16", "fp16"]))
    assert result.exit_code == 130, result.output
    assert f"Interrupted. Finished configurations are kept in {run}/results.jsonl" in result.output
    assert not [p.name for p in run.iterdir() if p.name.endswith(".tmp")]
    assert {sig: signal.getsignal(sig) for sig in handlers} == handlers


def test_a_signal_during_a_workers_start_waits_until_its_pid_is_known():
    """The SIGINT spawn race: the mask blocks signals in the main thread only, and the progress display runs a
    thread; a Ctrl-C handed to that thread used to raise KeyboardInterrupt inside Process.start()."""
    raised_inside = []
    go, sent = threading.Event(), threading.Event()

    def send_from_another_thread():  # started before the block, so this thread does not mask the signal
        go.wait()
        os.kill(os.getpid(), signal.SIGINT)
        sent.set()

    thread = threading.Thread(target=send_from_another_thread)
    thread.start()
    with pytest.raises(KeyboardInterrupt) as stop:
        with run_signals.signals_blocked(run_signals.STOP_SIGNALS):
            go.set()
            try:
                sent.wait()
                deadline = time.monotonic() + 0.5
                while time.monotonic() < deadline:  # bytecode runs: a handler raising would raise here
                    pass
            except KeyboardInterrupt:
                raised_inside.append(True)
    thread.join()
    assert not raised_inside and stop.value.args == ()
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


# --- refused up front ---------------------------------------------------------------------------------------


@pytest.fixture
def no_worker(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a worker was started")

    monkeypatch.setattr(orchestrator, "run_isolated", refuse)


@pytest.mark.parametrize("options, message", [
    (["--memory-cap", "1e19"], "is more than this machine's"),
    (["--batch", "100000000000000000000"], "--batch must be a positive integer (8k = 8192), got '1000"),
    (["--batch", "٣"], "--batch must be a positive integer (8k = 8192), got '٣'"),
    (["--prompt-tokens", "０8"], "--prompt-tokens must be a positive integer (8k = 8192), got '０8'"),
    (["--repeats", "٣"], "must be a whole number written with the digits 0-9"),
    (["--batch", "70000"], "batch is 70,000, more than falconbench runs (at most 65,536)"),
    (["--prompt-tokens", "300"], "need 301 positions; tiny-falcon-config"),
    (["-d", ",,"], "--dtype was given an empty value"),
    (["-d", ""], "--dtype was given an empty value"),
])
def test_bad_run_values_are_refused_before_any_worker(tiny_falcon_config, tmp_path, no_worker, options, message):
    """Issue: --memory-cap 1e19 (OverflowError) and --batch 10^20 (C++ frames) failed in every worker, exit 0."""
    out = tmp_path / "out"
    result = invoke("run", "-m", tiny_falcon_config, "--random-weights", *TINY, *options, "-o", out)
    assert result.exit_code == 2 and message in result.output and "Traceback" not in result.output, \
        result.output
    assert not out.exists()


@pytest.mark.parametrize("content, message", [(b"", "is empty"), (b"  \n", "is empty"),
                                              (b"\xff\xfe bad", "is not UTF-8 text (byte 0)")])
def test_an_empty_or_non_utf8_eval_text_is_refused_up_front(tiny_falcon_dir, tmp_path, no_worker, content, message):
    text = tmp_path / "text.txt"
    text.write_bytes(content)
    out = tmp_path / "out"
    result = invoke("run", "-m", tiny_falcon_dir, "--eval-text", text, *TINY, "-o", out)
    assert result.exit_code == 2 and message in result.output, result.output
    assert not out.exists()


def test_an_empty_output_is_refused_not_the_current_folder(tiny_falcon_config, tmp_path, no_worker, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = invoke("run", "-m", tiny_falcon_config, "--random-weights", *TINY, "-o", "")
    assert result.exit_code == 2 and "--output is empty" in result.output
    assert list(tmp_path.iterdir()) == []


def test_a_model_folder_named_with_a_non_utf8_byte_is_refused_before_the_output_exists(tmp_path, no_worker):
    folder = Path(os.fsdecode(os.fsencode(str(tmp_path)) + b"/m\xff"))
    write_config(folder, TINY_FALCON)
    out = tmp_path / "out"
    result = invoke("run", "-m", folder, "--random-weights", *TINY, "-o", out)
    assert result.exit_code == 2 and "holds bytes that are not UTF-8" in result.output
    assert not out.exists()


@pytest.mark.parametrize("args, message", [
    (["plan", "-m", ""], "--model was given an empty value"),
    (["plan", "-c", ""], "--context was given an empty value"),
    (["plan", "-c", "٣"], "--context must be a positive integer (8k = 8192), got '٣'"),
    (["plan", "-c", "1" + "0" * 400], "--context must be a positive integer (8k = 8192), got '1" + "0" * 39 + "'..."),
    (["fit", "-m", "falcon-7b", "-g", ","], "--gpu was given an empty value"),
])
def test_empty_lists_and_odd_digits_are_refused(args, message):
    result = invoke(*args)
    assert result.exit_code == 2 and message in result.output, result.output


@pytest.mark.parametrize("config, message", [
    ('{"model_type": "llama", "hidden_size": ' + "7" * 5000 + "}", "hidden_size is an integer of 5,000 digits"),
    ('{"model_type": "llama", "rope_scaling": {"factor": [' + "1" * 50 + "]}}",
     "rope_scaling.factor[0] is an integer of 50 digits"),
    ('{"model_type": "llama", "x": ' + "[" * 100000 + "]" * 100000 + "}", "is nested too deeply"),
])
def test_oversized_integers_and_deep_nesting_in_config_json_are_named(tmp_path, config, message):
    (tmp_path / "config.json").write_text(config)
    result = invoke("plan", "-m", tmp_path)
    assert result.exit_code == ConfigError.exit_code and message in result.output, result.output


@pytest.mark.parametrize("offsets", [5, [0, None], [0, "abc"], [8, 4], [True, 8]])
def test_malformed_safetensors_offsets_are_one_clear_error(tiny_falcon_dir, tmp_path, no_worker, offsets):
    folder = tmp_path / "model"
    shutil.copytree(tiny_falcon_dir, folder)
    header = json.dumps({"w": {"dtype": "F32", "shape": [1], "data_offsets": offsets}}).encode()
    (folder / "model.safetensors").write_bytes(len(header).to_bytes(8, "little") + header + b"\0" * 8)
    result = invoke("run", "-m", folder, "--no-quality", *TINY, "-o", tmp_path / "out")
    assert result.exit_code == RunError.exit_code and "tensor 'w' has data_offsets" in result.output, result.output


# --- exit codes ---------------------------------------------------------------------------------------------


def test_a_run_whose_only_configuration_failed_exits_1(tiny_falcon_config, tmp_path, monkeypatch):
    """Issue: a run whose only configuration ran out of memory exited 0."""
    from falconbench.run.measurement import build_row

    def out_of_memory(configs, bases, output_dir, on_phase, on_row, bandwidth=None):
        for index, base in enumerate(bases):
            on_row(index, build_row(base, "oom", "CUDA out of memory", None))

    monkeypatch.setattr(orchestrator, "run_isolated", out_of_memory)
    result = invoke("run", "-m", tiny_falcon_config, "--random-weights", "-d", "bf16", *TINY, "-o", tmp_path / "o")
    assert result.exit_code == 1 and "bf16 sdpa p4+2 b1: oom" in result.output, result.output
    ok = invoke("report", tmp_path / "o")
    assert ok.exit_code == 0  # report shows failed rows; only run's exit code says the run failed


# --- scale --------------------------------------------------------------------------------------------------

SCALES = st.fixed_dictionaries({"layers": st.integers(1, 10**12), "vocab": st.integers(1, 10**15),
                                "context": st.integers(1, 10**18)})


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(base=st.sampled_from([TINY_FALCON, TINY_LLAMA]), scale=SCALES)
def test_plan_and_fit_answer_or_refuse_any_scale(tmp_path_factory, base, scale):
    """Issue: fit on 10^5 layers took 18 s, 10^6 ran past 120 s, 10^8 grew to 4.7 GB (its split listed every
    layer). Each call must end (an answer or one FalconbenchError); the bound only catches a hang."""
    folder = write_config(tmp_path_factory.mktemp("scale"),
                          {**base, "num_hidden_layers": scale["layers"], "vocab_size": scale["vocab"]})
    for call in (lambda: plan(models=[str(folder)], contexts=[scale["context"]]),
                 lambda: fit(str(folder), contexts=[scale["context"]])):
        within(HANG_SECONDS, call)


def within(seconds: float, call) -> None:
    """Run `call`; an answer or a FalconbenchError is fine, anything else fails, and so does running past
    `seconds` (a hang: SIGALRM interrupts it)."""
    def hang(signum, frame):
        raise TimeoutError(f"still running after {seconds} s")

    previous = signal.signal(signal.SIGALRM, hang)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        call()
    except FalconbenchError:
        pass
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def greedy(items, per_card, capacity):
    """In-order filling, one piece at a time: the oracle for the split's runs."""
    if any(per_card + item > capacity for item in items):
        return None
    loads = [per_card]
    for item in items:
        if loads[-1] + item > capacity:
            loads.append(per_card)
        loads[-1] += item
    return loads


def test_every_row_field_has_a_type_check():
    """A field added to RunResult needs its JSON type in FIELD_TYPES, or reading a row of it would crash."""
    from dataclasses import fields

    from falconbench.results import FIELD_TYPES, RunResult

    assert {f.type for f in fields(RunResult)} <= set(FIELD_TYPES)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 40), st.integers(0, 30)), min_size=1, max_size=5), st.integers(0, 20),
       st.integers(1, 150))
def test_the_split_by_runs_fills_cards_as_one_piece_at_a_time_does(runs, per_card, capacity):
    loads = pack(runs, per_card, capacity)
    assert (expand(loads) if loads is not None else None) == greedy(expand(runs), per_card, capacity)
