"""`falconbench run`."""

from __future__ import annotations

import click

from ..errors import EXIT_FAILURE, EXIT_INTERRUPTED, UsageError
from ..render.console import err_console
from ..run.config import RunConfig
from ..schemes import KV_DTYPE_AUTO
from .finetune import finetune_options, refuse_finetune_options, task_option
from .options import COUNT, WHOLE, apply, attn_list_option, batch_option, count_option, device_map_options, \
    device_option, dtype_option, format_option, kv_dtype_option, model_option, parse_max_memory, parse_size


@click.command("run")
@apply(model_option("Model folder with safetensors weights, cached hub id, bundled model (smollm2), or (with "
                    "--random-weights) a profile or config.json.", required=True),
       dtype_option(help="Schemes, one load each; with quality on, the --reference scheme runs first."),
       count_option("prompt-tokens", RunConfig.prompt_tokens, "Prompt lengths (prefill), e.g. 128,512,2k."),
       count_option("new-tokens", RunConfig.new_tokens, "Tokens generated per run, never stopped early."),
       batch_option("Sequences per run (per step with --task finetune)."), kv_dtype_option(), attn_list_option(),
       device_option())
@click.option("--random-weights", is_flag=True,
              help="Build the architecture from config.json with random weights (no download, same memory).")
@click.option("--repeats", type=WHOLE, default=RunConfig.repeats, show_default=True, help="Timed runs per configuration.")
@click.option("--warmup", type=WHOLE, default=RunConfig.warmup, show_default=True, help="Untimed runs before the timed ones.")
@click.option("--int8-threshold", type=float, default=RunConfig.int8_threshold, show_default=True,
              help="LLM.int8 outlier threshold.")
@click.option("--quality/--no-quality", default=True, show_default=True,
              help="Measure perplexity, KL and top-1 agreement against --reference (real weights only).")
@click.option("--reference", default=None,
              help="The scheme quality is compared against. Default: fp32 where it fits in half the memory "
                   "available (always for small models on CPU), else bf16.")
@click.option("--eval-text", type=click.Path(dir_okay=False), default=None,
              help="UTF-8 text to score. Default: the shipped public-domain novel excerpt.")
@click.option("--eval-tokens", type=COUNT, default=RunConfig.eval_tokens, show_default=True, help="Tokens of the text scored.")
@click.option("--window", type=COUNT, default=RunConfig.window, show_default=True, help="Tokens the model sees at once.")
@click.option("--stride", type=COUNT, default=RunConfig.stride, show_default=True, help="How far the window moves.")
@click.option("-o", "--output", type=click.Path(file_okay=False), default=None,
              help="Folder for results.jsonl and the report. Default: a new folder under reports/.")
@click.option("--resume", is_flag=True,
              help="Finish the run in --output: configurations with a final row are not run again.")
@click.option("--memory-cap", default=None, metavar="SIZE",
              help="Let each configuration's process grow by at most SIZE (e.g. 4G) after its imports, as on a "
                   "smaller machine (CPU memory; Linux).")
@device_map_options(offload=True)
@click.option("--trust-remote-code", is_flag=True,
              help="Run Python code shipped with the model (never needed for Falcon). Only for code you trust.")
@click.option("--allow-pickle", is_flag=True,
              help="Also load .bin/.pt weights (torch.load can run code from the file). Default: safetensors only.")
@click.option("--allow-downloads", is_flag=True,
              help="Fetch a hub id missing from the local cache (config, safetensors, tokenizer) and let the "
                   "Hugging Face libraries go online. Default: offline.")
@task_option
@finetune_options
@format_option()
def run_command(models, dtypes, prompt_tokens, new_tokens, batches, kv_dtype, attn_impls, device, random_weights,
                repeats, warmup, int8_threshold, quality, reference, eval_text, eval_tokens, window, stride, output,
                resume, memory_cap, device_map, max_memory, offload_folder, trust_remote_code, allow_pickle,
                allow_downloads, task, methods, lora_r, lora_targets, seq_lens, optimizer, gradient_checkpointing, fmt):
    """Measure the model at every point of the matrix (schemes × attention kernels × prompt lengths × new-token
    counts × batch sizes) beside the plan: one fresh process per scheme and kernel, its shape points inside it;
    then write the report into the output folder.

    Each point's row is appended to OUTPUT/results.jsonl as it finishes; an out-of-memory point gets its status,
    the larger points of its load are skipped, and the sweep goes on. Ctrl-C keeps every finished row; --resume
    finishes the rest.

    \b
    Examples:
      falconbench run -m smollm2 -d bf16,fp16,int8,nf4 --device cpu
      falconbench run -m smollm2 -d bf16,int8,nf4 --prompt-tokens 128,512,2k -b 1,4 --attn sdpa,eager --device cpu
      falconbench run -m ./my-falcon -d bf16,int8,nf4
      falconbench run -m falcon-7b --random-weights --device cuda --new-tokens 128
      falconbench run -m tiiuae/falcon-7b -d bf16,nf4 --format json
      falconbench run -m smollm2 -o reports/smol --resume
      falconbench run -m smollm2 -d bf16 --device cpu --device-map auto --max-memory cpu=120MiB
      falconbench run --task finetune -m smollm2 --method lora,qlora,full --seq-len 128 --device cpu
    """
    refuse_finetune_options(task, methods, seq_lens)
    budgets = parse_max_memory(max_memory)
    if task == "finetune" and (device_map or budgets or offload_folder):
        raise UsageError("--device-map, --max-memory and --offload-folder are for --task inference; a fine-tune "
                         "trains on one device (--device)")
    if task == "finetune":  # --repeats timed steps after --warmup untimed ones, --batch sequences per step
        from .finetune import given_dtypes
        from .run_finetune import run_finetune_command

        model, batch = one_model(models, kv_dtype), one_batch(batches)
        return run_finetune_command(model, given_dtypes(), device, repeats, warmup, batch, output, resume, methods,
                                    lora_r, lora_targets, seq_lens, optimizer, gradient_checkpointing, fmt)
    from ..render import run as render
    from ..run import RunSettings, run_benchmark

    model = one_model(models, kv_dtype)
    if trust_remote_code:
        err_console().print("WARNING: --trust-remote-code runs Python code that came with the model, with your "
                            "permissions. Use it only for code you have read or trust.", style="bold red",
                            markup=False, highlight=False)
    from .models import convert_bundled

    convert_bundled(model)  # once, under its own status line, before the sweep's progress starts
    settings = RunSettings(
        model=model, dtypes=tuple(dtypes), attns=tuple(attn_impls), prompt_tokens=tuple(prompt_tokens),
        new_tokens=tuple(new_tokens), batches=tuple(batches), device=device, output=output, resume=resume,
        quality=quality, random_weights=random_weights, repeats=repeats, warmup=warmup,
        int8_threshold=int8_threshold, reference=reference, eval_text=eval_text, eval_tokens=eval_tokens,
        window=window, stride=stride, memory_cap_bytes=parse_size(memory_cap), trust_remote_code=trust_remote_code,
        allow_pickle=allow_pickle, allow_downloads=allow_downloads, device_map=device_map,
        max_memory=tuple((budgets or {}).items()), offload_folder=offload_folder)
    progress = render.RunProgress()
    from ..run.signals import terminate_as_interrupt

    # NOTE: SIGTERM and SIGHUP act as Ctrl-C from here to the last line printed, the report's write included
    with terminate_as_interrupt():
        try:
            with progress:
                outcome = run_benchmark(settings, on_event=progress, report=True)
            show_outcome(outcome, fmt)
        except KeyboardInterrupt:
            where = progress.output_dir or output
            err_console().print(f"Interrupted. Finished configurations are kept in {where}/results.jsonl; finish "
                                f"the rest with the same command plus --output {where} --resume", markup=False,
                                highlight=False, soft_wrap=True)
            raise SystemExit(EXIT_INTERRUPTED) from None
    if outcome.failed:
        raise SystemExit(EXIT_FAILURE)


def show_outcome(outcome, fmt: str) -> None:
    """The tables (or the machine format), the skipped lines, and where the results and the report went."""
    from ..render import run as render

    if outcome.reference_choice:
        err_console().print(f"Quality reference: {outcome.reference_choice}", markup=False, highlight=False,
                            soft_wrap=True)
    if fmt == "json":
        click.echo(render.run_json(outcome.rows))
    elif outcome.rows:  # the same tables `falconbench report` prints, from the same rows
        print_comparison(fmt, outcome)
    for problem in outcome.problems:
        err_console().print(f"! skipped a line that is not a results row: {problem}", style="yellow",
                            markup=False, highlight=False, soft_wrap=True)
    err_console().print(f"Results appended to {outcome.results_path}", markup=False, highlight=False,
                        soft_wrap=True)
    if outcome.report_error is not None:
        err_console().print(f"! The report could not be written: {outcome.report_error}. The results are intact; "
                            f"retry with falconbench report {outcome.output_dir}", style="yellow", markup=False,
                            highlight=False, soft_wrap=True)
    elif outcome.report is not None:
        err_console().print(f"Report written to {outcome.report.out_dir / 'report.html'} (and report.md, "
                            "report.csv, PNG plots)", markup=False, highlight=False, soft_wrap=True)


def one_model(models: list[str], kv_dtype: str) -> str:
    """The one model a sweep measures; the cache is what transformers allocates (--kv-dtype auto)."""
    if kv_dtype != KV_DTYPE_AUTO:
        raise UsageError(f"run measures the KV cache transformers allocates, in each scheme's compute dtype, so "
                         f"--kv-dtype {kv_dtype} applies to plan and fit only. Leave it at {KV_DTYPE_AUTO} for run")
    if len(models) > 1:
        raise UsageError(f"run measures one model per sweep, got {len(models)}: {', '.join(models)}. Example: "
                         f"-m {models[0]}")
    return models[0]


def one_batch(batches: list[int]) -> int:
    """The one micro-batch a fine-tuning sweep measures."""
    if len(batches) > 1:
        raise UsageError(f"run --task finetune measures one micro-batch per sweep, got "
                         f"{', '.join(map(str, batches))}. Example: -b {batches[0]}")
    return batches[0]


def machine_output(fmt: str, outcome) -> str:
    """The run's comparison as CSV (raw units) or Markdown (report.md's text, settings and machine included)."""
    from ..render import report as report_render
    from ..report import load_comparison

    return report_render.comparison_text(fmt, load_comparison([outcome.output_dir]))


def print_comparison(fmt: str, outcome) -> None:
    """The run's comparison as tables, CSV or Markdown: the report's own view of the same rows."""
    from ..report import load_comparison

    show_comparison(fmt, load_comparison([outcome.output_dir]))


def show_comparison(fmt: str, comparison) -> None:
    """A comparison as `report` prints it (table), or as report.csv's / report.md's text (csv, markdown)."""
    from ..render import report as report_render

    if fmt == "table":
        report_render.print_comparison(comparison)
    else:
        click.echo(report_render.comparison_text(fmt, comparison), nl=False)
