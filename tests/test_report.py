"""`falconbench report`: the files it writes from a recorded results file, comparisons, broken input, plots."""

import base64
import csv
import json
from dataclasses import replace
import os
import re
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from falconbench.cli import cli
from falconbench.errors import ResultsError
from falconbench.render.console import reset_consoles
from falconbench.render.report import CSV_FIELDS
from falconbench.comparison import Spread, spread
from falconbench.report import load_comparison, write_atomic, write_report
from falconbench.results import RunResult, append_result, latest_rows, read_results, settings_hash
from falconbench.schemes import SCHEMES

DATA = Path(__file__).parent / "data"
# A real `falconbench run -m smollm2 --device cpu` (bf16, fp16, int8, nf4, with quality against bf16), with the
# model's config.json that `run` keeps beside it, so the planner can still draw its curves without the model.
RECORDED = DATA / "smollm2-cpu"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
PLOTS = ("memory.png", "latency.png", "quality.png", "context.png")


@pytest.fixture
def invoke(monkeypatch):
    monkeypatch.setenv("NO_COLOR", "1")
    monkeypatch.setenv("COLUMNS", "160")
    reset_consoles()
    yield lambda *args: CliRunner().invoke(cli, [str(a) for a in args])
    reset_consoles()


@pytest.fixture
def recorded(tmp_path) -> Path:
    """A copy of the recorded run folder."""
    return Path(shutil.copytree(RECORDED, tmp_path / "run"))


def expected_plots(rows) -> tuple[str, ...]:
    """The plots a report of `rows` has: all four, less quality when no row measured it."""
    return tuple(p for p in PLOTS if p != "quality.png" or any(r.perplexity is not None for r in rows))


def recorded_rows() -> list[RunResult]:
    rows, problems = read_results(RECORDED)
    assert not problems
    return latest_rows(rows)


def quality_fields(perplexity: float, reference_perplexity: float = 10.0, divergence: int | None = None) -> dict:
    """A row's quality fields as the quality measurement writes them (through its own result class)."""
    from falconbench.quality.result import QualityResult

    delta = perplexity - reference_perplexity
    return QualityResult(
        reference="bf16", is_reference=delta == 0, model_id="m", eval_text="t", text_sha256="0", eval_tokens=513,
        scored_tokens=512, token_hash="0", window=256, stride=128, perplexity=perplexity,
        reference_perplexity=reference_perplexity, delta_perplexity=delta, delta_ci_low=delta - 0.1,
        delta_ci_high=delta + 0.1, confidence=0.95, bootstrap_resamples=1000, ci_block_tokens=32,
        kl_mean=delta / 100, kl_p95=delta / 20, kl_p99=delta / 10, kl_max=delta, top1_agreement=1 - delta / 50,
        greedy_tokens=32, divergence_position=divergence, reference_file="r", reference_reused=False, seconds=1.0,
    ).as_fields()


def make_row(dtype="bf16", status="ok", model="falcon-7b", **values) -> RunResult:
    """A results row with its plan, and memory and speed when it is ok; quality only when given."""
    base = dict(plan={"weights_bytes": 2**30, "kv_cache_bytes": 2**24, "total_bytes": 2**30 + 2**27})
    if status == "ok":
        base.update(weights_bytes=2**30, kv_cache_bytes=2**24, peak_memory_bytes=2**30 + 2**28, ttft_seconds=0.05,
                    decode_tokens_per_second=20.0)
    base.update(values)
    row = RunResult(model=model, dtype=dtype, status=status, **base)
    return replace(row, config_hash=row.expected_hash())  # what a reader recomputes: one configuration per dtype


def write_rows(folder: Path, rows) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for row in rows:
        append_result(folder / "results.jsonl", row)
    return folder


def png_size(data: bytes) -> tuple[int, int]:
    assert data[:8] == PNG_MAGIC and data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def test_report_from_the_recorded_results_writes_every_file(recorded):
    rows = recorded_rows()
    plots = expected_plots(rows)
    result = write_report([recorded])
    assert result.out_dir == recorded
    assert sorted(p.name for p in result.paths) == sorted(plots + ("report.md", "report.csv", "report.html"))
    for name in plots:
        width, height = png_size((recorded / name).read_bytes())
        assert 500 <= width <= 2500 and 300 <= height <= 2500, (name, width, height)

    md = (recorded / "report.md").read_text()
    assert "| Dtype | Status | Weights | Δplan | KV cache | Δplan | Peak | Plan total | Δplan | Quantized |" in md
    assert "| Dtype | Status | Load | TTFT | TTFT p90 | Step | Step p90 | Step CV | Decode tok/s |" in md
    for row in rows:
        assert re.search(rf"^\| {re.escape(row.dtype)} \| {row.status} \|", md, re.M), row.dtype
    assert all(f"]({name})" in md for name in plots)

    with open(recorded / "report.csv", newline="") as handle:
        table = list(csv.DictReader(handle))
    assert tuple(table[0]) == CSV_FIELDS
    assert [(r["dtype"], r["status"]) for r in table] == [(r.dtype, r.status) for r in rows]
    for line, row in zip(table, rows):
        assert line["weights_bytes"] == str(row.weights_bytes)
        assert line["planned_total_bytes"] == str(row.planned_total_bytes)
        assert float(line["ttft_seconds"]) == row.ttft_seconds
        assert float(line["ttft_seconds_low"]) == min(row.latency["ttft_seconds"]["samples"])

    page = (recorded / "report.html").read_text()
    tables = 2 + ("quality.png" in plots)
    assert page.count("<table>") == tables and page.count("<tr") == tables * (len(rows) + 1)
    images = re.findall(r'<img src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)
    assert [base64.b64decode(i) for i in images] == [(recorded / n).read_bytes() for n in plots]
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:|//)|url\(|@import|<script""", page)


def test_the_recorded_spreads_are_read_from_runs_latency_detail(recorded):
    for row in load_comparison([recorded]).rows:
        assert row.ttft_spread.kind == "min-max of 3 repeats"
        assert row.decode_token_spread.kind.startswith("p10-p90 of ")
        assert row.decode_token_spread.low <= row.decode_token_seconds <= row.decode_token_spread.high


def test_cli_prints_the_tables_and_where_it_wrote(invoke, recorded, tmp_path):
    out = tmp_path / "elsewhere" / "report"
    result = invoke("report", recorded, "--out", out)
    assert result.exit_code == 0, result.output
    lines = [line.strip() for line in result.output.splitlines()]
    rows = recorded_rows()
    assert lines[0] == f"run: {rows[0].environment['cpu']}, {len(rows)} row(s) from {recorded}"
    assert "Memory" in lines and "Speed" in lines
    for row in rows:
        assert sum(line.split()[:2] == [row.dtype, row.status] for line in lines) >= 2, row.dtype
    assert f"into {out}" in " ".join(lines)
    assert (out / "report.html").is_file() and not any(recorded.glob("report.*"))


def test_a_corrupted_file_reports_the_valid_rows_and_one_line_per_invalid_row(invoke, recorded):
    good = (RECORDED / "results.jsonl").read_text().splitlines()
    broken = good[:2] + ["this is not json", json.dumps({"model": "falcon-7b", "status": "ok"}),
                         json.dumps({"model": "falcon-7b", "dtype": "int8", "status": "exploded"}),
                         "[1, 2, 3]"] + good[2:] + [good[-1][: len(good[-1]) // 2]]
    (recorded / "results.jsonl").write_text("\n".join(broken))
    result = invoke("report", recorded)
    assert result.exit_code == 0, result.output
    invalid = [line for line in result.output.splitlines() if line.startswith("! invalid row skipped")]
    last = len(broken)
    assert [int(re.search(r"results\.jsonl:(\d+):", line).group(1)) for line in invalid] == [3, 4, 5, 6, last]
    assert "not valid JSON" in invalid[0] and "missing field(s): dtype" in invalid[1]
    assert "status must be one of" in invalid[2] and "truncated write?" in invalid[4]
    md = (recorded / "report.md").read_text()
    assert "## Problems and notes" in md and md.count("invalid row skipped") == 5
    assert md.count("| ok |") == 3 * len(good)  # every valid row, in the memory, speed and quality tables


def test_failed_configurations_are_shown_as_such(tmp_path, invoke):
    folder = write_rows(tmp_path / "mixed", [
        make_row("bf16"), make_row("fp16", "oom", error="CUDA out of memory. Tried to allocate 2 GiB"),
        make_row("int8", "error", error="ImportError: bitsandbytes"), make_row("nf4", "interrupted"),
        make_row("fp4", "skipped")])
    result = invoke("report", folder)
    assert result.exit_code == 0, result.output
    for status in ("oom", "error", "interrupted", "skipped"):
        assert any(line.split()[:2][1:] == [status] for line in result.output.splitlines()), status
    assert "! mixed: falcon-7b fp16 oom: CUDA out of memory. Tried to allocate 2 GiB" in result.output
    page = (folder / "report.html").read_text()
    assert page.count("<tr class='failed'>") == 2 * 4
    assert (folder / "memory.png").is_file() and (folder / "latency.png").is_file()


@pytest.mark.parametrize("content", ["", "\n\n", "garbage\n{\"model\": 1}\n"])
def test_no_valid_row_is_one_clear_error(tmp_path, invoke, content):
    (tmp_path / "results.jsonl").write_text(content)
    with pytest.raises(ResultsError, match="no valid results row"):
        write_report([tmp_path])
    result = invoke("report", tmp_path)
    assert result.exit_code == 5
    assert result.output.startswith("Error: no valid results row in ") and result.output.count("\n") == 1
    assert not any(tmp_path.glob("report.*"))


def test_a_folder_without_results_is_an_error(tmp_path, invoke):
    result = invoke("report", tmp_path)
    assert result.exit_code == 3 and result.output.startswith(f"Error: {tmp_path / 'results.jsonl'}: no such file or folder")


def test_two_runs_are_compared_and_labelled_by_folder_and_device(tmp_path):
    env_a, env_b = {"gpu": "NVIDIA A100-SXM4-80GB"}, {"gpu": "NVIDIA H100 80GB HBM3"}
    a = write_rows(tmp_path / "a100", [make_row(d, environment=env_a) for d in ("bf16", "nf4")])
    b = write_rows(tmp_path / "h100", [make_row(d, environment=env_b, ttft_seconds=0.03) for d in ("bf16", "nf4")])
    result = write_report([a, b], tmp_path / "compare")
    assert [run.label for run in result.comparison.runs] == ["a100 (NVIDIA A100-SXM4-80GB)",
                                                             "h100 (NVIDIA H100 80GB HBM3)"]
    with open(tmp_path / "compare" / "report.csv", newline="") as handle:
        assert [(r["run"], r["dtype"]) for r in csv.DictReader(handle)] == [
            ("a100", "bf16"), ("a100", "nf4"), ("h100", "bf16"), ("h100", "nf4")]
    md = (tmp_path / "compare" / "report.md").read_text()
    assert "| Run | Dtype | Status |" in md and "| h100 | nf4 | ok |" in md
    # the GPUs the runs measured on join the capacity lines
    assert {"A100-80GB", "H100-80GB"} <= {g.name for g in result.comparison.capacity_gpus}


def test_runs_with_the_same_folder_name_get_distinct_names(tmp_path):
    a = write_rows(tmp_path / "v1" / "run", [make_row()])
    b = write_rows(tmp_path / "v2" / "run", [make_row()])
    assert [r.name for r in load_comparison([a, b]).runs] == ["v1/run", "v2/run"]


def test_without_quality_the_quality_plot_is_skipped_with_a_note(tmp_path):
    folder = write_rows(tmp_path / "run", [make_row("bf16"), make_row("int8")])
    (folder / "quality.png").write_bytes(b"an earlier report's plot")
    result = write_report([folder])
    assert not (folder / "quality.png").exists()
    assert any(line.startswith("quality.png skipped: no quality was measured") for line in result.lines)
    md = (folder / "report.md").read_text()
    assert "PPL" not in md and "Top-1" not in md and "quality.png skipped" in md


def test_a_model_the_planner_cannot_resolve_skips_only_the_context_plot(tmp_path):
    folder = write_rows(tmp_path / "run", [make_row(model=str(tmp_path / "deleted-model"))])
    result = write_report([folder])
    assert not (folder / "context.png").exists() and (folder / "memory.png").exists()
    assert any("memory against context skipped for" in line and "deleted-model" in line for line in result.lines)


def forget_model_folder(run: Path) -> None:
    """Point the rows' recorded model folder at one that does not exist, as on any machine but the recording one."""
    rows = [json.loads(line) for line in (run / "results.jsonl").read_text().splitlines()]
    for row in rows:
        row["settings"]["model_source"]["folder"] = str(run / "gone")
        row["config_hash"] = settings_hash(row["dtype"], row["settings"])  # as run names such a row
    (run / "results.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))


def test_the_context_curves_come_from_the_planner_with_the_config_kept_in_the_run_folder(recorded):
    from falconbench.planner import plan_point
    from falconbench.sources import resolve_model

    forget_model_folder(recorded)
    comparison = load_comparison([recorded])
    spec = resolve_model(str(RECORDED / "config.json")).spec()
    for curve, row in zip(comparison.curves, comparison.rows):
        assert curve.dtype == row.dtype and curve.contexts[0] <= row.cached_tokens < curve.contexts[1]
        assert curve.contexts[-1] == 32768
        expected = [plan_point(spec, SCHEMES[row.dtype], c, 1, row.kv_dtype).total_bytes for c in curve.contexts]
        assert list(curve.total_bytes) == expected
    assert len(comparison.curves) == len(comparison.rows)


def test_a_config_that_is_not_the_measured_one_is_not_planned(recorded):
    from falconbench.planner import plan_point
    from falconbench.sources import resolve_model

    measured = resolve_model(str(RECORDED / "config.json")).spec()
    config = json.loads((recorded / "config.json").read_text())
    (recorded / "config.json").write_text(json.dumps({**config, "num_hidden_layers": 3}))
    forget_model_folder(recorded)
    comparison = load_comparison([recorded])
    assert len(comparison.curves) == len(comparison.rows)
    # The edited config is never planned. The bundled model's name still resolves to its own config, whose digest
    # is the measured one, so a curve, if drawn, is the measured config's.
    for curve, row in zip(comparison.curves, comparison.rows):
        assert list(curve.total_bytes) == [plan_point(measured, SCHEMES[row.dtype], c, 1, row.kv_dtype).total_bytes
                                           for c in curve.contexts]


@pytest.fixture
def measured(tmp_path) -> Path:
    """A run of falcon-7b with memory, speed and quality in four schemes, and one out of memory."""
    rows = [make_row(d, **quality_fields(p, divergence=v), environment={"gpu": "NVIDIA A100-SXM4-80GB"})
            for d, p, v in (("bf16", 10.0, None), ("fp16", 10.02, None), ("int8", 10.1, 17), ("nf4", 10.6, 4))]
    return write_rows(tmp_path / "a100", rows + [make_row("nf4-dq", "oom", error="CUDA out of memory")])


def test_quality_is_tabled_and_plotted(measured):
    result = write_report([measured])
    assert (measured / "quality.png").is_file()
    md = (measured / "report.md").read_text()
    assert "| Dtype | Status | PPL | Δ PPL % [CI] | KL | KL p95 | Top-1 | Greedy diverges |" in md
    assert "| nf4 | ok | 10.60 | +6.0% [+5.0, +7.0] | 0.0060 | 0.0300 | 98.8% | token 4 |" in md
    assert "| bf16 | ok | 10.00 | +0.0% [-1.0, +1.0] | 0.0000 | 0.0000 | 100.0% | none of 32 |" in md
    assert "Δplan: (measured − planned) / planned" in md
    assert "Δ PPL % is (perplexity − the reference's) / the reference's" in md
    assert "| nf4-dq | oom | - | - |" in md and result.lines == ("a100: falcon-7b nf4-dq oom: CUDA out of memory",)


def test_every_plot_colours_a_scheme_the_same(measured):
    from matplotlib.colors import to_hex

    from falconbench import plots

    colors = list(plots.SCHEME_COLORS.values())
    assert len(set(colors)) == len(colors) and set(plots.SCHEME_COLORS) == set(SCHEMES)
    comparison = load_comparison([measured])
    ok = [r.dtype for r in comparison.rows if r.status == "ok"]
    for draw in (plots.latency_figure, plots.quality_figure):
        for ax in draw(comparison).axes:
            bars = [to_hex(p.get_facecolor()) for p in ax.patches]
            assert bars == [plots.SCHEME_COLORS[d].lower() for d in ok], ax.get_title()
    (ax,) = plots.memory_figure(comparison).axes
    assert {to_hex(p.get_facecolor()) for p in ax.patches} == {plots.SCHEME_COLORS[d].lower() for d in ok} | {
        plots.SCHEME_COLORS["nf4-dq"].lower()}  # the oom row still has its planned bar
    lines = plots.context_figure(comparison).axes[0].get_lines()
    drawn = {line.get_label().split()[0]: to_hex(line.get_color()) for line in lines if line.get_marker() == "o"}
    assert drawn == {d: plots.SCHEME_COLORS[d].lower() for d in comparison.schemes}


@pytest.mark.parametrize("latency, expected", [
    ({"ttft_seconds": {"median": 2.0, "p90": 3.0, "samples": [1.0, 2.0, 4.0]}}, Spread(1.0, 4.0, "min-max of 3 repeats")),
    ({"ttft_seconds_samples": [0.5, 0.7]}, Spread(0.5, 0.7, "min-max of 2 repeats")),
    ({"ttft": {"p10": 1.0, "p90": 2.0}}, Spread(1.0, 2.0, "p10-p90")),
    ({"ttft_seconds": {"median": 2.0, "p90": 2.5, "samples": [2.0]}}, Spread(2.0, 2.5, "median-p90")),
    ({"ttft_seconds": {"median": 2.0, "cv": 0.1}}, Spread(1.8, 2.2, "median ± 1 SD")),
    ({"ttft_seconds": {"samples": "1,2"}, "ttft": [1, 2]}, None),
    ({"ttft_seconds": {"median": float("nan"), "cv": 0.1}}, None),
    ({}, None),
])
def test_spread_reads_what_the_latency_detail_holds(latency, expected):
    found = spread(latency, ("ttft_seconds", "ttft"))
    if expected is None:
        assert found is None
    else:
        assert (found.low, found.high, found.kind) == pytest.approx((expected.low, expected.high, expected.kind))


def test_values_of_the_wrong_type_are_dropped_not_trusted(tmp_path):
    folder = write_rows(tmp_path / "run", [make_row(kv_cache_bytes=-5, quality={"delta_ci_low": 0.1,
                                                                                "delta_ci_high": "x"},
                                                    settings={"batch": "4"})])
    (row,) = load_comparison([folder]).rows
    assert row.kv_cache_bytes is None and row.perplexity_change_ci is None and row.batch == 1


@pytest.mark.parametrize("field, value, kind", [("weights_bytes", "1 GiB", "int or null"),
                                                ("ttft_seconds", True, "float or null"), ("settings", "batch=4", "dict")])
def test_a_row_field_of_the_wrong_type_makes_the_line_no_row(tmp_path, field, value, kind):
    folder = write_rows(tmp_path / "run", [make_row("bf16"), make_row("nf4", **{field: value})])
    comparison = load_comparison([folder])
    assert [row.dtype for row in comparison.rows] == ["bf16"]
    assert any(f"results.jsonl:2: not a results row: {field} must be {kind}" in p for p in comparison.problems)


def test_impossible_timings_leave_out_their_spread_not_the_report(tmp_path):
    """A zero or negative timing in a damaged file must not stop the report (a rate of 0 was a division by zero,
    a negative median a refused spread)."""
    folder = write_rows(tmp_path / "run", [
        make_row("bf16", latency={"decode_tokens_per_second": {"samples": [0.0, 5.0]}}),
        make_row("nf4", latency={"ttft_seconds": {"median": -1.0, "cv": 0.1}})])
    bf16, nf4 = load_comparison([folder]).rows
    assert bf16.decode_token_seconds == pytest.approx(1 / 20) and bf16.decode_token_spread is None
    assert bf16.decode_spread == Spread(0.0, 5.0, "min-max of 2 repeats")
    assert nf4.ttft_spread is None and nf4.ttft_seconds == 0.05


def test_a_row_that_cannot_be_shown_is_a_line_not_a_crash(tmp_path, monkeypatch):
    from falconbench import report

    folder = write_rows(tmp_path / "run", [make_row("bf16"), make_row("nf4")])
    real = report.scheme_row

    def failing(run, result, folder=None):
        if result.dtype == "nf4":
            raise ValueError("a figure no run writes")
        return real(run, result, folder)

    monkeypatch.setattr(report, "scheme_row", failing)
    comparison = load_comparison([folder])
    assert [r.dtype for r in comparison.rows] == ["bf16"] and comparison.runs[0].rows == 1
    assert comparison.problems == (f"invalid row skipped: {folder / 'results.jsonl'}: falcon-7b nf4: a figure no "
                                   "run writes",)


def test_write_atomic_replaces_whole_files_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "report.md"
    target.write_text("old")
    write_atomic(target, b"new")
    assert target.read_bytes() == b"new" and [p.name for p in tmp_path.iterdir()] == ["report.md"]
    mask = os.umask(0o022)
    os.umask(mask)
    assert target.stat().st_mode & 0o777 == 0o666 & ~mask
    with pytest.raises(ResultsError, match="cannot write"):
        write_atomic(tmp_path / "missing" / "x.md", b"")


def test_importing_the_report_core_loads_no_plotting_library():
    code = "import sys, falconbench.report, falconbench.cli.report; print('matplotlib' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=True).stdout.strip() == "False"


@pytest.mark.parametrize("weights, shown", [(2**30, "exact"), (2**30 + 128, "+128 B"), (2**30 - 2**18, "-256 KiB"),
                                            (2**30 - 2**20, "-0.1%"), (int(2**30 * 1.1), "+10.0%")])
def test_memory_against_the_plan_is_exact_a_percentage_or_bytes(tmp_path, weights, shown):
    from falconbench.render.report import report_cells

    folder = write_rows(tmp_path / "run", [make_row(weights_bytes=weights)])
    memory = report_cells(load_comparison([folder]))[0]
    assert memory.title == "Memory" and memory.body[0][memory.headers.index("Δplan")] == shown
