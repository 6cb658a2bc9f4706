"""Every table at 80, 100 and 200 columns: no line wider than the terminal, no number or name split or cut."""

import io
from pathlib import Path

import pytest
from rich.cells import cell_len
from rich.console import Console
from rich.text import Text

from falconbench import api
from falconbench.finetune import FinetuneSetup, plan_finetune
from falconbench.finetune_fit import fit_finetune
from falconbench.render import finetune as finetune_render
from falconbench.render import fit as fit_render
from falconbench.render import models as models_render
from falconbench.render import plan as plan_render
from falconbench.render import report as report_render
from falconbench.render.console import Col, Grid
from falconbench.report import load_comparison
from falconbench.zoo import list_models

WIDTHS = (80, 100, 200)
RECORDED = Path(__file__).parent / "data" / "smollm2-cpu"
MATRIX = Path(__file__).parent / "data" / "smollm2-matrix"
FINETUNE = Path(__file__).parent / "data" / "smollm2-finetune"


def both():
    """The recorded inference run and the recorded fine-tuning run as one run folder would hold them."""
    from falconbench.report import comparison_of
    from falconbench.results import read_finetune_rows, read_results

    return comparison_of([("both", "both", RECORDED, read_results(RECORDED)[0], [], read_finetune_rows(FINETUNE))])


def grids() -> dict[str, list[Grid]]:
    return {
        "plan seed": [plan_render.plan_table(api.plan())],
        "plan with warnings": [plan_render.plan_table(api.plan(["falcon-40b", "mistral-7b"], ["bf16", "nf4"],
                                                               [2048, 32768], [1, 8]))],
        "fit": fit_render.fit_tables(api.fit("falcon-40b", contexts=8192,
                                             gpus=["A100-40GB", "A100-80GB", "H100-80GB", "H200"])),
        "fit calibrated-like headers": fit_render.fit_tables(api.fit("falcon-180b", dtypes=["bf16", "fp16", "int8",
                                                                                           "nf4", "fp4"])),
        "models": [models_render.models_table(list_models())],
        "plan --task finetune": [finetune_render.plan_table(plan_finetune(
            ["falcon-7b", "falcon-40b"], [FinetuneSetup(m, seq_len=s, gradient_checkpointing=True)
                                          for m in ("lora", "qlora", "full") for s in (512, 2048)]))],
        "fit --task finetune": [finetune_render.fit_table(fit_finetune(
            "falcon-40b", [FinetuneSetup(m, seq_len=512) for m in ("qlora", "lora", "full")]))],
        "report (run prints the same)": report_render.report_tables(load_comparison([RECORDED])),
        "report of a matrix": report_render.report_tables(load_comparison([MATRIX])),
        "report of fine-tuning (run --task finetune prints the same)":
            report_render.report_tables(load_comparison([FINETUNE])),
        "report of inference and fine-tuning": report_render.report_tables(both()),
    }


def render(grid: Grid, width: int) -> str:
    console = Console(file=io.StringIO(), width=width, color_system=None, legacy_windows=False)
    console.print(grid)
    return console.file.getvalue()


def plain(text: str, markup: bool) -> str:
    return Text.from_markup(text).plain if markup else text


def assert_nothing_broken(grid: Grid, width: int) -> None:
    out = render(grid, width)
    lines = out.splitlines()
    assert all(cell_len(line) <= width for line in lines), out
    words = set(out.split())
    hidden = next((line for line in lines if line.startswith("Not shown at")), "")
    for row in grid.rows:
        for column, cell in zip(grid.columns, row):
            for part in plain(cell, grid.markup).split("\n"):
                if not part.strip():
                    continue
                if column.wrap or column.retreat == "note":  # prose: may wrap, but only between words
                    assert set(part.split()) <= words, (column.header, part, out)
                else:
                    assert any(part in line for line in lines) or column.header in hidden, (column.header, part, out)
    for text in (grid.title, grid.caption):  # wrapped at word boundaries: every word whole
        assert set(plain(text, grid.markup).split()) <= words, out


@pytest.mark.parametrize("width", WIDTHS)
@pytest.mark.parametrize("name", list(grids()))
def test_no_cell_is_broken(name, width):
    for grid in grids()[name]:
        assert_nothing_broken(grid, width)


def test_the_seed_plan_at_80_columns_keeps_every_figure_and_folds_attn_and_gpu():
    out = render(plan_render.plan_table(api.plan()), 80)
    assert "Dtype: bf16 · Context: 2,048 · Batch: 1" in out  # the same in every row: said once
    assert "Attn · Smallest GPU" in out and "MQA (1 KV) · A10G" in out
    assert "121.60 GiB" in out and "898.2 MiB" in out and "127.48 GiB" in out and "Not shown" not in out


def test_at_200_columns_the_plan_is_one_table_with_every_header_on_one_line():
    out = render(plan_render.plan_table(api.plan()), 200)
    header = next(line for line in out.splitlines() if "Model" in line)
    assert all(h in header for h in ("Model", "Attn", "Dtype", "Context", "Batch", "Weights", "KV cache", "Runtime*",
                                     "Total", "Smallest GPU"))


def test_a_column_that_cannot_fit_is_named_under_the_table():
    grid = Grid([Col("Name"), Col("Figure", True), Col("Extra", priority=1, retreat="drop")],
                [["a-long-model-name", "1,234.5 GiB", "x" * 40]], caption="A caption.")
    out = render(grid, 40)
    assert "x" * 40 not in out and "Not shown at 40 columns: Extra" in out and "1,234.5 GiB" in out


def test_columns_beyond_the_width_continue_in_a_second_table_repeating_the_first():
    grid = Grid([Col("Key")] + [Col(f"Column {i}", True) for i in range(8)], [["k1"] + [f"{i:,}000.5" for i in range(8)]])
    out = render(grid, 60)
    assert out.count("Key") == 2 and all(f"{i:,}000.5" in out for i in range(8))
    assert all(cell_len(line) <= 60 for line in out.splitlines())


def test_where_no_table_fits_each_row_becomes_header_value_lines():
    grid = Grid([Col("Model"), Col("Weights", True)], [["falcon-7b", "12.89 GiB"]])
    assert render(grid, 20).splitlines() == ["Model: falcon-7b", "  Weights: 12.89 GiB"]
