"""The run matrix: shape points inside one process per load, each its own row with the plan beside it; resume per
point; an out-of-memory point in the middle of a load; `run` and `report` print the same tables."""

import json
import shutil

import pytest
from click.testing import CliRunner

pytest.importorskip("torch")
pytest.importorskip("transformers")

from falconbench.cli import cli  # noqa: E402
from falconbench.results import read_results  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread_per_worker")]
MATRIX = ["-d", "bf16", "--attn", "sdpa,eager", "--prompt-tokens", "8,16", "-b", "1,2", "--new-tokens", "3", "--repeats", "1",
          "--warmup", "1", "--device", "cpu"]


def run(*args):
    result = CliRunner().invoke(cli, ["run", *map(str, args)], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result


def loads_started(folder) -> list[str]:
    return [line for line in (folder / "worker.log").read_text().splitlines() if line.startswith("=== ")]


@pytest.fixture(scope="module")
def matrix(tmp_path_factory, tiny_llama_config):
    folder = tmp_path_factory.mktemp("matrix") / "out"
    result = run("-m", tiny_llama_config, "--random-weights", *MATRIX, "-o", folder)
    return folder, result


def test_every_point_is_a_row_inside_one_process_per_load(matrix):
    folder, _ = matrix
    rows, problems = read_results(folder)
    assert not problems and len(rows) == 8 and len({r.config_hash for r in rows}) == 8
    assert [line.split()[2:5] for line in loads_started(folder)] == [["bf16", "sdpa", "4"], ["bf16", "eager", "4"]]
    points = {(r.settings["attn_impl"], r.settings["prompt_tokens"], r.settings["batch"]) for r in rows}
    assert points == {(a, p, b) for a in ("sdpa", "eager") for p in (8, 16) for b in (1, 2)}
    for row in rows:
        assert row.status == "ok", row.error
        assert row.kv_cache_bytes == row.planned_kv_cache_bytes  # measured = planned, at every point
        assert row.memory["kv_cache_tokens"] == row.settings["prompt_tokens"] + 3 - 1
        assert row.plan["attn_impl"] == row.settings["attn_impl"] and row.plan["batch"] == row.settings["batch"]
        assert (row.plan["attention_scores_bytes"] > 0) == (row.settings["attn_impl"] == "eager")
        assert set(row.memory["phases"]) == {"load", "prefill", "decode"}
        assert isinstance(row.memory["prefill_runtime_bytes"], int)
        assert row.latency["ttft_seconds"]["n"] == 1
    # the copy bandwidth is measured once per run, by the first worker, and handed to the second
    bandwidths = {json.dumps(r.environment["copy_bandwidth"], sort_keys=True) for r in rows}
    assert len(bandwidths) == 1 and rows[0].environment["copy_bandwidth"]["bytes_per_second"] > 1e8
    # smallest first inside a load: the planned totals rise in the order the points finished
    for attn in ("sdpa", "eager"):
        totals = [r.planned_total_bytes for r in rows if r.settings["attn_impl"] == attn]
        assert totals == sorted(totals)


def test_resume_runs_only_the_points_without_a_row(matrix, tmp_path, tiny_llama_config):
    folder, _ = matrix
    copy = tmp_path / "out"
    shutil.copytree(folder, copy)
    lines = (copy / "results.jsonl").read_text().splitlines(keepends=True)
    (copy / "results.jsonl").write_text("".join(lines[:5]))  # as if stopped in the second load's second point
    run("-m", tiny_llama_config, "--random-weights", *MATRIX, "-o", copy, "--resume")
    assert loads_started(copy)[2:] == loads_started(copy)[2:3]  # one new process...
    assert loads_started(copy)[2].split()[2:5] == ["bf16", "eager", "3"]  # ...for the three missing points
    text = (copy / "results.jsonl").read_text()
    assert text.startswith("".join(lines[:5]))  # the finished points are kept byte for byte
    rows, _ = read_results(copy)
    assert len(rows) == 8 and {r.config_hash for r in rows} == {json.loads(l)["config_hash"] for l in lines}


def test_an_out_of_memory_point_is_its_row_and_larger_points_are_skipped(tmp_path):
    """Under --memory-cap, eager attention's 8k × 8k score matrix cannot be allocated; the smaller points of the
    same load run, the 8k point is oom, and the point that needs at least as much is skipped, saying why."""
    from falconbench.errors import EXIT_FAILURE
    from tiny_models import TINY_LLAMA, write_config

    folder, model = tmp_path / "out", write_config(tmp_path / "long-llama", {**TINY_LLAMA,
                                                                           "max_position_embeddings": 16384})
    result = CliRunner().invoke(cli, ["run", "-m", str(model), "--random-weights", "-d", "bf16", "--attn", "eager",
                                      "--prompt-tokens", "8,8k", "-b", "1,2", "--new-tokens", "2", "--repeats", "1",
                                      "--warmup", "0", "--device", "cpu", "--memory-cap", "512M", "-o", str(folder)],
                                catch_exceptions=False)
    assert result.exit_code == EXIT_FAILURE, result.output  # a point ran out of memory: the run says so
    rows, _ = read_results(folder)
    by_shape = {(r.settings["prompt_tokens"], r.settings["batch"]): r for r in rows}
    assert len(loads_started(folder)) == 1
    assert [by_shape[8, 1].status, by_shape[8, 2].status] == ["ok", "ok"]
    assert by_shape[8192, 1].status == "oom" and "can't allocate memory" in by_shape[8192, 1].error
    assert by_shape[8192, 1].weights_bytes > 0 and by_shape[8192, 1].planned_total_bytes > 2**30
    assert by_shape[8192, 2].status == "skipped"
    assert "prompt 8192 + 2 new × batch 1 needed, which ran out of memory" in by_shape[8192, 2].error
    # resumed after the skipped row was lost: the recorded oom still bounds it, and no process starts for it
    lines = (folder / "results.jsonl").read_text().splitlines(keepends=True)
    (folder / "results.jsonl").write_text("".join(l for l in lines if json.loads(l)["status"] != "skipped"))
    again = CliRunner().invoke(cli, ["run", "-m", str(model), "--random-weights", "-d", "bf16", "--attn", "eager",
                                     "--prompt-tokens", "8,8k", "-b", "1,2", "--new-tokens", "2", "--repeats", "1",
                                     "--warmup", "0", "--device", "cpu", "--memory-cap", "512M", "-o", str(folder),
                                     "--resume"], catch_exceptions=False)
    assert again.exit_code == EXIT_FAILURE, again.output
    assert "p8192+2 b2: skipped: not run" in again.output  # recorded now, not found in the file
    rows, _ = read_results(folder)
    assert len(loads_started(folder)) == 1 and sorted(r.status for r in rows) == ["ok", "ok", "oom", "skipped"]


def test_a_load_goes_on_after_an_out_of_memory_point(monkeypatch):
    """The worker's loop: the point that ran out of memory is its row, the point it bounds is skipped, and a point
    it does not bound still runs, after the memory is handed back."""
    from falconbench.run import worker
    from falconbench.run.config import RunConfig
    from falconbench.run.measurement import Measurement

    points = [RunConfig(model="m", dtype="bf16", prompt_tokens=p, batch=b) for p, b in ((8, 1), (64, 1), (64, 2), (8, 4))]
    released = []

    def speed(point, model, tracker, on_phase):
        if point.prompt_tokens == 64:
            raise MemoryError("can't allocate memory")
        return f"measured {point.prompt_tokens}×{point.batch}"

    monkeypatch.setattr(worker, "speed_phase", speed)
    monkeypatch.setattr(worker, "release_memory", lambda device: released.append(device))
    emitted = []
    worker.measure_points(points, None, None, lambda kind, **fields: emitted.append(fields), Measurement({}, {}))
    assert [e["status"] for e in emitted] == ["ok", "oom", "skipped", "ok"]
    assert emitted[3]["measurement"].speed == "measured 8×4" and len(released) >= 4


def test_run_and_report_print_the_same_tables(matrix):
    """The same rows, one view: what `run` printed at the end of the sweep is what `report` prints of its folder,
    character for character (Δ PPL in %, the same columns, the same caption)."""
    folder, result = matrix
    shown = CliRunner().invoke(cli, ["report", str(folder)], catch_exceptions=False)
    assert shown.exit_code == 0, shown.output
    assert "Runtime estimates against measured" in result.stdout and "Attn" in result.stdout
    assert result.stdout == shown.stdout


def test_run_prints_csv_and_markdown(matrix, tiny_llama_config, tmp_path):
    folder, _ = matrix
    copy = tmp_path / "out"
    shutil.copytree(folder, copy)
    args = ["-m", tiny_llama_config, "--random-weights", *MATRIX, "-o", copy, "--resume"]
    csv_text = run(*args, "--format", "csv").stdout  # every point done: nothing runs, the rows print
    assert csv_text.splitlines()[0].startswith("task,run,model,dtype,status,error,attn,prompt_tokens,new_tokens,batch")
    assert len(csv_text.splitlines()) == 1 + 8
    markdown = run(*args, "--format", "markdown").stdout
    assert "| Dtype | Attn | Prompt | Batch | Status | Weights |" in markdown


def test_gpu_check_runs_its_matrix_as_a_cpu_dry_run(tmp_path):
    """benchmarks/gpu_check.py cannot run here (no GPU); its --dry-run runs the same script, machinery and tables
    on a tiny Falcon on CPU."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parent.parent / "benchmarks" / "gpu_check.py"
    done = subprocess.run([sys.executable, str(script), "--dry-run", "--dtype", "bf16", "--output", str(tmp_path / "out")],
                          capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    rows, _ = read_results(tmp_path / "out")
    assert sorted((r.settings["prompt_tokens"], r.settings["batch"]) for r in rows) == [(8, 1), (8, 2), (16, 1),
                                                                                       (16, 2)]
    assert all(r.status == "ok" and r.kv_cache_bytes == r.planned_kv_cache_bytes for r in rows)
    assert "Runtime estimates against measured" in done.stdout and "the matrix took" in done.stdout
