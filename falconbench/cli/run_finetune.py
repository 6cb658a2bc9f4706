"""`falconbench run --task finetune`: real training steps per setup, planned beside measured."""

from __future__ import annotations

import click

from ..render.console import err_console
from .finetune import setups_from_options


def run_finetune_command(model, dtypes, device, repeats, warmup, batch, output, resume, methods, lora_r,
                         lora_targets, seq_lens, optimizer, gradient_checkpointing, fmt) -> None:
    from ..render import finetune as render
    from ..report import finetune_comparison
    from ..run.orchestrator import resolve_device
    from ..train.measure import StepSettings
    from ..train.sweep import run_finetune
    from .models import convert_bundled
    from .run import show_comparison

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
    elif outcome.rows:  # the fine-tuning view `falconbench report` prints, of the same rows
        show_comparison(fmt, finetune_comparison(outcome.output_dir, outcome.rows))
    err_console().print(f"Results appended to {outcome.results_path}", markup=False, highlight=False, soft_wrap=True)
