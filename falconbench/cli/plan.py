"""`falconbench plan`."""

from __future__ import annotations

import click

from ..planner import ATTN_IMPLS, DEVICES, SEED_MODELS, plan
from ..render.console import FORMATS, console
from ..schemes import KV_DTYPES
from .options import int_list, split_list


@click.command("plan")
@click.option("-m", "--model", "models", multiple=True, metavar="M[,M...]",
              help="Profile name, model folder, config.json path, or cached hub id. Default: the seed's 7 models.")
@click.option("-d", "--dtype", "dtypes", multiple=True, metavar="D[,D...]",
              help="fp32, bf16, fp16, int8, nf4, nf4-dq, fp4. Default: bf16.")
@click.option("-c", "--context", "contexts", multiple=True, metavar="N[,N...]",
              help="Tokens in the KV cache (prompt + generated); 8k = 8192. Default: 2048.")
@click.option("-b", "--batch", "batches", multiple=True, metavar="B[,B...]", help="Sequences. Default: 1.")
@click.option("--kv-dtype", type=click.Choice(list(KV_DTYPES)), default="bf16", show_default=True,
              help="KV cache element type (16-bit whatever the weights' scheme).")
@click.option("--attn", "attn_impl", type=click.Choice(ATTN_IMPLS), default="sdpa", show_default=True,
              help="Attention kernel: eager materializes the score matrix.")
@click.option("--device", type=click.Choice(DEVICES), default="cuda", show_default=True,
              help="cuda adds the CUDA context estimate.")
@click.option("-f", "--format", "fmt", type=click.Choice(FORMATS), default="table", show_default=True)
def plan_command(models, dtypes, contexts, batches, kv_dtype, attn_impl, device, fmt):
    """Exact weights and KV-cache memory, plus estimated runtime memory.

    Each option takes a comma list and may repeat; the rows are the cross product.

    \b
    Examples:
      falconbench plan
      falconbench plan -m falcon-40b -d bf16,int8,nf4 -c 2048,8k,32k
      falconbench plan -m ./my-model/config.json -b 1,8 --format json
    """
    from ..render import plan as render

    rows = plan(models=split_list(models) or SEED_MODELS, dtypes=split_list(dtypes) or ["bf16"],
                contexts=int_list("context", contexts) or [2048], batches=int_list("batch", batches) or [1],
                kv_dtype=kv_dtype, attn_impl=attn_impl, device=device)
    if fmt == "table":
        console().print(render.plan_table(rows))
    else:
        click.echo({"json": render.plan_json, "csv": render.plan_csv, "markdown": render.plan_markdown}[fmt](rows),
                   nl=fmt == "json")
