"""`falconbench plan`."""

from __future__ import annotations

import click

from ..api import plan
from ..errors import UsageError
from ..planner import SEED_MODELS
from ..render.console import console
from .finetune import finetune_options, given_dtypes, plan_finetune_command, refuse_finetune_options, task_option
from .options import apply, attn_option, batch_option, context_option, device_map_options, device_option, \
    dtype_option, format_option, kv_dtype_option, model_option, parse_max_memory


@click.command("plan")
@apply(model_option("Profile name, model folder, config.json path, or cached hub id. Default: the seed's 7 models."),
       dtype_option(default=("bf16",)), context_option(), batch_option(), kv_dtype_option(), attn_option(),
       device_option(), device_map_options(), task_option, finetune_options, format_option())
def plan_command(models, dtypes, contexts, batches, kv_dtype, attn_impl, device, device_map, max_memory, task,
                 methods, lora_r, lora_targets, seq_lens, optimizer, gradient_checkpointing, fmt):
    """Exact weights and KV-cache memory, plus estimated runtime memory.

    Each list option takes a comma list and may repeat; the rows are the cross product.

    \b
    Examples:
      falconbench plan
      falconbench plan -m falcon-40b -d bf16,int8,nf4 -c 2048,8k,32k
      falconbench plan -m ./my-model/config.json -b 1,8 --format json
      falconbench plan -m falcon-40b --device-map auto --max-memory 0=40GiB,1=40GiB,cpu=60GiB
      falconbench plan --task finetune -m falcon-7b --method lora,qlora,full --seq-len 512,2k
    """
    refuse_finetune_options(task, methods, seq_lens)
    budgets = parse_max_memory(max_memory)
    if task == "finetune" and (device_map or budgets):
        raise UsageError("--device-map and --max-memory are for --task inference")
    if task == "finetune":
        return plan_finetune_command(models, given_dtypes(), batches, device, methods, lora_r, lora_targets,
                                     seq_lens, optimizer, gradient_checkpointing, fmt)
    from ..render import plan as render

    rows = plan(models or SEED_MODELS, dtypes, contexts, batches, kv_dtype=kv_dtype, attn_impl=attn_impl,
                device=device, device_map=device_map, max_memory=budgets)
    if fmt == "table":
        console().print(render.plan_table(rows))
        for line in render.placement_lines(rows):
            console().print(line, highlight=False, markup=False)
    else:
        click.echo({"json": render.plan_json, "csv": render.plan_csv, "markdown": render.plan_markdown}[fmt](rows),
                   nl=fmt == "json")
