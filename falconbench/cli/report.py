"""`falconbench report`."""

from __future__ import annotations

import click

from ..render.console import err_console


@click.command("report")
@click.argument("run_dirs", nargs=-1, required=True, metavar="DIR [DIR...]",
                type=click.Path(exists=True, file_okay=True, dir_okay=True))
@click.option("-o", "--out", "out_dir", type=click.Path(file_okay=False), default=None,
              help="Folder for the report files. Default: the first DIR.")
def report_command(run_dirs, out_dir):
    """Tables and plots of one run, or of several side by side.

    Reads DIR/results.jsonl (as `falconbench run` writes it), prints the memory, speed and quality tables,
    and writes report.md, report.csv, report.html (one self-contained page) and PNG plots: memory, latency,
    quality, and the planner's memory against context length. Fine-tuning rows (`run --task finetune`) get their
    own tables (planned beside measured, per component and per phase) and plot. Invalid lines are listed, never
    fatal.

    \b
    Examples:
      falconbench report runs/a100
      falconbench report runs/a100 runs/h100 --out runs/compare
      falconbench report runs/smollm2-finetune
    """
    from ..render import report as render
    from ..report import write_report

    result = write_report(run_dirs, out_dir)
    render.print_comparison(result.comparison)
    for line in result.lines:
        err_console().print(f"! {line}", style="yellow", markup=False, highlight=False, soft_wrap=True)
    names = ", ".join(path.name for path in result.paths)
    err_console().print(f"Wrote {names} into {result.out_dir}", markup=False, highlight=False, soft_wrap=True)
