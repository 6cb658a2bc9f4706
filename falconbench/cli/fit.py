"""`falconbench fit`."""

from __future__ import annotations

import click

from ..api import fit
from ..planner import SAFETY_MARGIN
from ..render.console import console
from ..errors import UsageError
from .finetune import finetune_options, fit_finetune_command, given_dtypes, refuse_finetune_options, task_option
from .options import apply, attn_option, batch_option, context_option, device_map_options, device_option, \
    dtype_option, format_option, given_list, kv_dtype_option, model_option, parse_max_memory


@click.command("fit")
@apply(model_option("Profile name, model folder, config.json path, or cached hub id; several give one table "
                    "each.", required=True),
       dtype_option(help="Schemes, most precise first (the recommendation prefers earlier ones)."),
       context_option(), batch_option(), kv_dtype_option(), attn_option(), device_option(),
       click.option("-g", "--gpu", "gpus", multiple=True, metavar="G[,G...]",
                    help="GPU profile names (a wrong one lists them all). Default: every profile."),
       click.option("--margin", type=float, default=SAFETY_MARGIN, show_default=True,
                    help="Fraction of each card kept free (allocator fragmentation, driver)."),
       click.option("--calibrate", "calibrate", metavar="DIR",
                    help="A `falconbench run` folder: its measured weights and runtime overhead replace the "
                         "estimates."),
       device_map_options(), task_option, finetune_options, format_option())
def fit_command(models, dtypes, contexts, batches, kv_dtype, attn_impl, device, gpus, margin, calibrate, device_map,
                max_memory, task, methods, lora_r, lora_targets, seq_lens, optimizer, gradient_checkpointing, fmt):
    """Which GPU, which dtype, and how much context and batch fit.

    For every GPU × dtype: whether weights + KV cache + runtime fit the card less the margin, the headroom,
    the longest context at this batch and the largest batch at this context, how many cards of that kind a
    split needs, bf16 support, and a memory-bandwidth bound on decode speed.

    \b
    Examples:
      falconbench fit -m falcon-7b
      falconbench fit -m falcon-40b -c 8k -b 1,8 -g A100-80GB,H100-80GB
      falconbench fit -m falcon-7b,llama-7b -d bf16,nf4
      falconbench fit -m falcon-7b --calibrate reports/run-1 --format json
      falconbench fit -m falcon-40b -d bf16 -g A100-80GB --device-map auto --max-memory 0=60GiB,cpu=100GiB
      falconbench fit --task finetune -m falcon-7b --method qlora --seq-len 512 --gradient-checkpointing -g T4
    """
    refuse_finetune_options(task, methods, seq_lens)
    budgets = parse_max_memory(max_memory)
    if task == "finetune" and (device_map or budgets):
        raise UsageError("--device-map and --max-memory are for --task inference")
    if task == "finetune":
        if calibrate or click.get_current_context().get_parameter_source("contexts").name != "DEFAULT":
            raise UsageError("--calibrate and --context are for --task inference; a fine-tune takes --seq-len")
        return fit_finetune_command(models, given_dtypes(), batches, gpus, margin, methods, lora_r, lora_targets,
                                    seq_lens, optimizer, gradient_checkpointing, fmt)
    from ..render import fit as render

    results = fit(models, dtypes, contexts, batches, gpus=given_list("gpu", gpus, "A100-80GB,H100-80GB") or None, margin=margin,
                  calibrate=calibrate, kv_dtype=kv_dtype, attn_impl=attn_impl, device=device, device_map=device_map,
                  max_memory=budgets)
    if fmt == "table":
        out = console()
        for result in results:
            for table in render.fit_tables(result):
                out.print(table)
            for line in render.notes(result):
                out.print(line, highlight=False, markup=False)  # wrapped between words
    else:
        click.echo(render.FORMATTERS[fmt](results), nl=fmt == "json")
