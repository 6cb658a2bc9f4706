"""`falconbench run`."""

from __future__ import annotations

import click

from ..render.console import console, err_console
from ..run.config import DEFAULT_INT8_THRESHOLD, RUN_DEVICES
from ..schemes import SCHEMES
from .options import split_list

RUN_FORMATS = ("table", "json")


@click.command("run")
@click.option("-m", "--model", required=True,
              help="Model folder with safetensors weights, cached hub id, or (with --random-weights) a profile "
                   "or config.json.")
@click.option("-d", "--dtype", "dtypes", multiple=True, metavar="D[,D...]",
              help=f"Schemes, the first is the reference: {', '.join(SCHEMES)}. Default: bf16,fp16,int8,nf4.")
@click.option("--device", type=click.Choice(RUN_DEVICES), default="auto", show_default=True,
              help="auto picks cuda when torch sees a GPU.")
@click.option("--random-weights", is_flag=True,
              help="Build the architecture from config.json with random weights (no download, same memory).")
@click.option("--prompt-tokens", type=int, default=128, show_default=True, help="Prompt length (prefill).")
@click.option("--new-tokens", type=int, default=32, show_default=True,
              help="Tokens generated per run, never stopped early.")
@click.option("--repeats", type=int, default=3, show_default=True, help="Timed runs per configuration.")
@click.option("--warmup", type=int, default=1, show_default=True, help="Untimed runs before the timed ones.")
@click.option("-b", "--batch", type=int, default=1, show_default=True, help="Sequences per run.")
@click.option("--int8-threshold", type=float, default=DEFAULT_INT8_THRESHOLD, show_default=True,
              help="LLM.int8 outlier threshold.")
@click.option("-o", "--output", type=click.Path(file_okay=False), default=None,
              help="Folder for results.jsonl (appended). Default: a new folder under reports/.")
@click.option("-f", "--format", "fmt", type=click.Choice(RUN_FORMATS), default="table", show_default=True)
def run_command(model, dtypes, device, random_weights, prompt_tokens, new_tokens, repeats, warmup, batch,
                int8_threshold, output, fmt):
    """Load the model in each scheme, each in a fresh process, and measure memory and speed beside the plan.

    Each row is appended to OUTPUT/results.jsonl as its configuration finishes; an out-of-memory or failed
    configuration gets its status and the sweep goes on.

    \b
    Examples:
      falconbench run -m ./my-falcon -d bf16,int8,nf4
      falconbench run -m falcon-7b --random-weights --device cuda --new-tokens 128
      falconbench run -m tiiuae/falcon-7b -d bf16,nf4 --format json
    """
    from ..render import run as render
    from ..run import run_benchmark

    with render.RunProgress() as progress:
        outcome = run_benchmark(model, split_list(dtypes) or ["bf16", "fp16", "int8", "nf4"], device=device,
                                output=output, on_event=progress, random_weights=random_weights,
                                prompt_tokens=prompt_tokens, new_tokens=new_tokens, repeats=repeats, warmup=warmup,
                                batch=batch, int8_threshold=int8_threshold)
    if fmt == "json":
        click.echo(render.run_json(outcome.rows))
    else:
        for table in render.run_tables(outcome.rows):
            console().print(table)
    err_console().print(f"Results appended to {outcome.results_path}", markup=False, highlight=False,
                        soft_wrap=True)
