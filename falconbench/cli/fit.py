"""`falconbench fit`."""

from __future__ import annotations

import click

from ..fit import fit
from ..schemes import DEFAULT_DTYPES
from ..planner import SAFETY_MARGIN
from ..render.console import FORMATS, console
from .options import int_list, split_list


@click.command("fit")
@click.option("-m", "--model", required=True, metavar="M",
              help="Profile name, model folder, config.json path, or cached hub id.")
@click.option("-d", "--dtype", "dtypes", multiple=True, metavar="D[,D...]",
              help="Schemes, most precise first (the recommendation prefers earlier ones). "
                   f"Default: {','.join(DEFAULT_DTYPES)}.")
@click.option("-c", "--context", "contexts", multiple=True, metavar="N[,N...]",
              help="Tokens in the KV cache (prompt + generated); 8k = 8192. Default: 2048.")
@click.option("-b", "--batch", "batches", multiple=True, metavar="B[,B...]", help="Sequences. Default: 1.")
@click.option("-g", "--gpu", "gpus", multiple=True, metavar="G[,G...]",
              help="GPU profile names (a wrong one lists them all). Default: every profile.")
@click.option("--margin", type=float, default=SAFETY_MARGIN, show_default=True,
              help="Fraction of each card kept free (allocator fragmentation, driver).")
@click.option("--calibrate", "calibrate", metavar="DIR",
              help="A `falconbench run` folder: its measured weights and runtime overhead replace the estimates.")
@click.option("-f", "--format", "fmt", type=click.Choice(FORMATS), default="table", show_default=True)
def fit_command(model, dtypes, contexts, batches, gpus, margin, calibrate, fmt):
    """Which GPU, which dtype, and how much context and batch fit.

    For every GPU × dtype: whether weights + KV cache + runtime fit the card less the margin, the headroom,
    the longest context at this batch and the largest batch at this context, how many cards of that kind a
    split needs, bf16 support, and a memory-bandwidth bound on decode speed.

    \b
    Examples:
      falconbench fit -m falcon-7b
      falconbench fit -m falcon-40b -c 8k -b 1,8 -g A100-80GB,H100-80GB
      falconbench fit -m falcon-7b --calibrate reports/run-1 --format json
    """
    from ..render import fit as render

    result = fit(model, dtypes=split_list(dtypes) or DEFAULT_DTYPES, contexts=int_list("context", contexts) or [2048],
                 batches=int_list("batch", batches) or [1], gpus=split_list(gpus) or None, margin=margin,
                 calibrate=calibrate)
    if fmt == "table":
        out = console()
        for table in render.fit_tables(result):
            out.print(table)
        for line in render.notes(result):
            out.print(line, highlight=False, markup=False, soft_wrap=True)  # whole lines, to copy
    else:
        click.echo({"json": render.fit_json, "csv": render.fit_csv, "markdown": render.fit_markdown}[fmt](result),
                   nl=fmt == "json")
