"""`falconbench run --task finetune`: real training steps per setup, planned beside measured."""

from __future__ import annotations

import click

from ..errors import UsageError
from ..render.console import console, err_console
from .finetune import setups_from_options


def run_finetune_command(model, dtypes, device, repeats, warmup, batch, output, resume, methods, lora_r,
                         lora_targets, seq_lens, optimizer, gradient_checkpointing, fmt) -> None:
    from ..render import finetune as render
    from ..run.orchestrator import resolve_device
    from ..train.measure import StepSettings
    from ..train.sweep import run_finetune
    from .models import convert_bundled

    if fmt == "csv":
        raise UsageError("run --task finetune prints a table, json or markdown. Example: --format json")
    setups = setups_from_options(methods, dtypes, lora_r, lora_targets, seq_lens, [batch], optimizer,
                                 gradient_checkpointing)
    settings = StepSettings(steps=repeats, warmup=warmup, device=resolve_device(device))
    convert_bundled(model)  # once, under its own status line

    def progress(row) -> None:
        err_console().print(f"  {row['planned']['method']} {row['dtype']} seq {row['planned']['seq_len']}: "
                            f"{row['status']}", markup=False, highlight=False)

    outcome = run_finetune(model, setups, settings, output=output, resume=resume, on_row=progress)
    if fmt == "json":
        click.echo(render.run_json(outcome.rows))
    elif fmt == "markdown":
        click.echo(render.run_markdown(outcome.rows), nl=False)
    else:
        for table in render.run_tables(outcome.rows):
            console().print(table)
    err_console().print(f"Results appended to {outcome.results_path}", markup=False, highlight=False, soft_wrap=True)
