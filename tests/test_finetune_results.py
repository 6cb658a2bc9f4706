"""`falconbench report` on fine-tuning rows: a folder of them alone, beside inference rows, broken rows, the CSV,
the planned phase peaks, and the plot."""

import csv
import json
import shutil
from pathlib import Path

import pytest

from falconbench.finetune import COMPONENTS as COMPONENT_TABLE
from falconbench.finetune import PHASE_COMPONENTS, FinetuneSetup, phase_peak_bytes, plan_finetune_point
from falconbench.finetune_results import COMPONENTS, finetune_result, measured_phase_peaks
from falconbench.render.report import report_cells
from falconbench.report import load_comparison, write_report
from falconbench.sources import resolve_model

DATA = Path(__file__).parent / "data"
# A real `falconbench run --task finetune -m smollm2 --method lora,qlora,full --seq-len 128,256 --device cpu
# --repeats 2 --warmup 1`, with and without --gradient-checkpointing (the README's run).
FINETUNE = DATA / "smollm2-finetune"
INFERENCE = DATA / "smollm2-cpu"
CLI_COLUMNS = 80


def raw_rows() -> list[dict]:
    return [json.loads(line) for line in (FINETUNE / "results.jsonl").read_text().splitlines()]


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


@pytest.fixture
def finetune_only(tmp_path) -> Path:
    return Path(shutil.copytree(FINETUNE, tmp_path / "ft"))


def test_a_folder_of_fine_tuning_rows_alone_gets_its_tables_csv_and_plot(finetune_only):
    result = write_report([finetune_only])
    names = {p.name for p in result.paths}
    assert names == {"finetune.png", "report.md", "report.csv", "report.html"}
    assert (finetune_only / "finetune.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert result.plot_notes == ()  # no inference plot is missed by a run of fine-tuning alone
    markdown = (finetune_only / "report.md").read_text()
    assert "## Fine-tuning steps" in markdown and markdown.count("## Fine-tuning memory: smollm2 · ") == 12
    assert "![Fine-tuning: memory per component" in markdown
    raw = raw_rows()
    table = read_csv(finetune_only / "report.csv")
    assert [r["task"] for r in table] == ["finetune"] * len(raw) == ["finetune"] * 12
    for line, row in zip(table, raw):  # raw units, straight from the recorded row
        measured, planned = row["measured"], row["planned"]
        for name in COMPONENTS:  # step_temporary_bytes: newer than these rows, and never measured: blank
            assert line[name] == str(measured.get(name, "")) and line[f"planned_{name}"] == str(planned.get(name, ""))
        assert int(line["trainable_params"]) == measured["trainable_params"] == int(line["planned_trainable_params"])
        baseline = measured["memory"]["rss_baseline_bytes"]
        assert int(line["backward_peak_bytes"]) == measured["memory"]["phases"]["backward"]["rss_peak_bytes"] - baseline
        assert int(line["planned_backward_peak_bytes"]) == planned["total_bytes"]
        assert float(line["loss_first"]) == measured["losses"][0] and float(line["loss_last"]) == measured["losses"][-1]
        if planned["method"] != "full":
            assert int(line["adapter_file_bytes"]) == int(line["adapter_bytes"]) + int(line["adapter_header_bytes"])
            assert line["adapter_bytes"] == line["planned_adapter_bytes"]


def test_the_component_table_sets_planned_beside_measured_and_each_phase_peak(finetune_only):
    comparison = load_comparison([finetune_only])
    cells = report_cells(comparison)
    steps = cells[0]
    assert steps.title == "Fine-tuning steps" and steps.headers[:2] == ("Setup", "Status")
    assert [row[0] for row in steps.body][:2] == ["lora r16 bf16 128×1", "lora r16 bf16 256×1"]
    assert steps.body[0][steps.headers.index("Loss first → last")] == "3.832 → 3.463"
    deltas = cells[1]
    assert deltas.headers[0] == "Setup" and "Status" not in deltas.headers
    first = dict(zip(deltas.headers, deltas.body[0]))
    assert (first["Trainable"], first["Frozen"], first["Copies"], first["Bwd peak"]) == ("exact", "+256 B", "-",
                                                                                         "+30.5%")
    lora = cells[2]
    assert lora.title == "Fine-tuning memory: smollm2 · lora r16 bf16 128×1 · ok"
    lines = {row[0]: row[1:] for row in lora.body}
    assert lines["Trainable params"] == ("3.5 MiB", "3.5 MiB", "exact")
    assert lines["Frozen weights"][2] == "+256 B"  # the rotary inv_freq buffer the planner leaves out
    assert "16-bit copies" not in lines and "Recompute" not in lines  # zero planned and measured: left out
    assert list(lines)[-3:] == ["Peak: forward", "Peak: backward", "Peak: optimizer step"]
    full = next(c for c in cells if c.title.endswith("full bf16 128×1 ckpt · ok"))
    assert "16-bit copies" in {row[0] for row in full.body} and "Recompute" in {row[0] for row in full.body}


def test_a_folder_of_both_shows_both(tmp_path):
    folder = Path(shutil.copytree(INFERENCE, tmp_path / "both"))
    with open(folder / "results.jsonl", "a") as handle:
        handle.write((FINETUNE / "results.jsonl").read_text())
    result = write_report([folder])
    comparison = result.comparison
    assert len(comparison.rows) == 4 and len(comparison.finetune) == 12
    titles = [c.title for c in report_cells(comparison)]
    assert titles[0] == "Memory" and "Quality" in titles and "Fine-tuning steps" in titles
    assert {"memory.png", "finetune.png"} <= {p.name for p in result.paths}
    table = read_csv(folder / "report.csv")
    assert [r["task"] for r in table] == ["inference"] * 4 + ["finetune"] * 12
    assert table[0]["weights_bytes"] and not table[-1]["weights_bytes"] and table[-1]["trainable_params"]
    from falconbench.render.report import run_lines

    assert run_lines(comparison) == [f"both: AMD EPYC, 4 row(s), 12 fine-tuning row(s) from {folder}"]


def test_fine_tuning_rows_that_cannot_be_shown_are_lines_and_a_failed_setup_says_why(tmp_path):
    rows = raw_rows()[:2]
    rows[1] = {**rows[1], "status": "oom", "error": "CUDA out of memory", "measured": {}}
    lines = [json.dumps(r) for r in rows] + [json.dumps({"task": "finetune", "model": 3, "status": "ok"})]
    (tmp_path / "results.jsonl").write_text("\n".join(lines) + "\n")
    result = write_report([tmp_path])
    assert len(result.comparison.finetune) == 2
    assert any(line.startswith("invalid fine-tuning row skipped:") for line in result.lines)
    steps = report_cells(result.comparison)[0]
    assert steps.failed == (False, True) and steps.body[1][1] == "oom"
    assert "lora r16 bf16 256×1: oom: CUDA out of memory" in (tmp_path / "report.md").read_text()
    assert len(report_cells(result.comparison)) == 3  # the failed setup measured no component: no table of them


def test_report_prints_the_fine_tuning_tables_at_80_columns(invoke, finetune_only):
    result = invoke("report", str(finetune_only))
    assert result.exit_code == 0, result.output
    assert "Fine-tuning steps" in result.stdout and "Peak: optimizer step" in result.stdout
    first, *rest = result.stdout.splitlines()
    assert first == f"ft: AMD EPYC, 12 fine-tuning row(s) from {finetune_only}"  # a path: never cut
    assert all(len(line) <= 80 for line in rest)
    assert "Wrote finetune.png, report.md, report.csv, report.html" in result.stderr


def test_planned_phase_peaks_are_the_components_alive_then():
    plan = plan_finetune_point(resolve_model("falcon-7b").spec(), FinetuneSetup("full", seq_len=512))
    peaks = plan.as_dict()["phase_peak_bytes"]
    assert plan.total_bytes == max(peaks.values())
    assert peaks["forward"] == (plan.frozen_weights_bytes + plan.trainable_bytes + plan.weight_copy_bytes
                                + plan.optimizer_bytes + plan.activation_bytes + plan.logits_bytes
                                + plan.cuda_context_bytes)
    assert peaks["optimizer"] == (plan.frozen_weights_bytes + plan.trainable_bytes + plan.gradient_bytes
                                  + plan.optimizer_bytes + plan.step_temporary_bytes + plan.cuda_context_bytes)
    every = {c.name for c in COMPONENT_TABLE}
    assert set(PHASE_COMPONENTS["backward"]) == every - {"step_temporary_bytes"}  # the step's own, after backward
    assert phase_peak_bytes(plan.as_dict()) == peaks


def test_a_cuda_row_compares_torch_s_peaks_with_the_plan_less_the_cuda_context():
    row = raw_rows()[0]
    planned = {**row["planned"], "cuda_context_bytes": 512 * 2**20, "device": "cuda"}
    memory = {"phases": {p: {"torch_peak_allocated_bytes": 100 + i} for i, p in
                         enumerate(("forward", "backward", "optimizer"))}}
    shown = finetune_result("run", {**row, "planned": planned, "measured": {**row["measured"], "memory": memory}})
    assert shown.measured_peaks == {"forward": 100, "backward": 101, "optimizer": 102}
    assert shown.peak_source == "torch's peak allocated"
    assert shown.planned_peaks["backward"] == row["planned"]["total_bytes"]  # its recorded total had no context
    nvml = {"phases": {"backward": {"nvml_peak_used_bytes": 7, "torch_peak_allocated_bytes": 5}}}
    assert measured_phase_peaks(nvml) == ({"forward": None, "backward": 7, "optimizer": None},
                                          "NVML device use above the baseline")


def test_a_row_s_falconbench_version_is_read_and_shown_where_its_environment_has_none():
    from falconbench.comparison import Comparison
    from falconbench.render.finetune_rows import finetune_caption_lines

    row = raw_rows()[0]
    assert "falconbench" not in row["measured"]["environment"] and "falconbench_version" not in row  # older rows
    assert finetune_result("run", row).versions.get("falconbench") is None
    shown = finetune_result("run", {**row, "falconbench_version": "9.9.9"})
    assert shown.versions["falconbench"] == "9.9.9"
    assert shown.versions["torch"] == row["measured"]["environment"]["torch"]
    lines = finetune_caption_lines(Comparison((), (), finetune=(shown,)))
    assert any("; falconbench 9.9.9, python" in line for line in lines)
