"""The fine-tuning options shared by `plan`, `fit` and `run` (`--task finetune`), and their one parse."""

from __future__ import annotations

from typing import Callable, Iterable

import click

from ..errors import UsageError
from ..finetune import (ALL_LINEAR, DEFAULT_DTYPE, DEFAULT_LORA_R, METHOD_DTYPES, METHODS, OPTIMIZERS, TASKS,
                        FinetuneSetup)
from ..schemes import get_scheme
from ..render.console import console
from .options import count_list, split_list

DEFAULT_SEQ_LEN = 512


def task_option(function: Callable) -> Callable:
    return click.option("--task", type=click.Choice(TASKS), default="inference", show_default=True,
                        help="Plan serving (inference) or training (finetune).")(function)


def finetune_options(function: Callable) -> Callable:
    """--method, --lora-r, --lora-targets, --seq-len, --optimizer, --gradient-checkpointing (with --task finetune)."""
    options = [
        click.option("--method", "methods", multiple=True, metavar="M[,M...]",
                     help=f"With --task finetune: {', '.join(METHODS)}. Default: lora."),
        click.option("--lora-r", type=int, default=DEFAULT_LORA_R, show_default=True, help="LoRA rank."),
        click.option("--lora-targets", default=None, metavar="NAME[,NAME...]",
                     help=f"Modules LoRA adapts, or {ALL_LINEAR}. Default: peft's default for the model type."),
        click.option("--seq-len", "seq_lens", multiple=True, metavar="N[,N...]",
                     help=f"Training sequence length; 2k = 2048. Default: {DEFAULT_SEQ_LEN}."),
        click.option("--optimizer", type=click.Choice(list(OPTIMIZERS)), default="adamw", show_default=True),
        click.option("--gradient-checkpointing/--no-gradient-checkpointing", default=False, show_default=True,
                     help="Recompute each layer in backward instead of keeping its activations."),
    ]
    for option in reversed(options):
        function = option(function)
    return function


def finetune_setups(methods: Iterable[str], dtypes: Iterable[str], lora_r: int, lora_targets: str | None,
                    seq_lens: Iterable[int], batches: Iterable[int], optimizer: str,
                    gradient_checkpointing: bool) -> list[FinetuneSetup]:
    """Setups for methods × their dtypes × sequence lengths × batches. A dtype goes to the methods that take it
    (bf16 to lora and full, nf4-dq to qlora); a method none of the dtypes suit keeps its default."""
    methods = split_list(methods) or ["lora"]
    for method in methods:
        if method not in METHODS:
            raise UsageError(f"unknown fine-tuning method {method!r}. Choose from: {', '.join(METHODS)}")
    names = [get_scheme(d).name for d in split_list(dtypes)]
    unused = [d for d in names if not any(d in METHOD_DTYPES[m] for m in methods)]
    if unused:
        raise UsageError(f"--dtype {', '.join(unused)} suits none of --method {', '.join(methods)}. "
                         + "; ".join(f"{m} takes {', '.join(METHOD_DTYPES[m])}" for m in methods))
    targets = tuple(split_list([lora_targets])) if lora_targets else None
    setups = []
    for method in methods:
        chosen = [d for d in names if d in METHOD_DTYPES[method]] or [DEFAULT_DTYPE[method]]
        for dtype in chosen:
            for seq_len in seq_lens or [DEFAULT_SEQ_LEN]:
                for batch in batches or [1]:
                    setups.append(FinetuneSetup(method, dtype, lora_r, targets, seq_len, batch, optimizer,
                                                gradient_checkpointing))
    return setups


def setups_from_options(methods, dtypes, lora_r, lora_targets, seq_lens, batches, optimizer,
                        gradient_checkpointing) -> list[FinetuneSetup]:
    """The click values (comma lists; batches already counted) → setups."""
    return finetune_setups(methods, dtypes, lora_r, lora_targets, count_list("seq-len", seq_lens, "512,2k"),
                           list(batches), optimizer, gradient_checkpointing)


def given_dtypes() -> list[str]:
    """The --dtype values the user gave; none when they were left out (inference's default list is not a
    fine-tune's: each method then takes its own default)."""
    context = click.get_current_context()
    if context.get_parameter_source("dtypes") == click.core.ParameterSource.DEFAULT:
        return []
    return list(context.params["dtypes"])


def plan_finetune_command(models, dtypes, batches, device, methods, lora_r, lora_targets, seq_lens, optimizer,
                          gradient_checkpointing, fmt) -> None:
    """`plan --task finetune`."""
    from ..finetune import plan_finetune
    from ..render import finetune as render

    setups = setups_from_options(methods, dtypes, lora_r, lora_targets, seq_lens, batches, optimizer,
                                 gradient_checkpointing)
    rows = plan_finetune(list(models) or ["falcon-7b"], setups, device)
    if fmt == "table":
        console().print(render.plan_table(rows))
    else:
        click.echo({"json": render.plan_json, "csv": render.plan_csv, "markdown": render.plan_markdown}[fmt](rows),
                   nl=fmt == "json")


def fit_finetune_command(models, dtypes, batches, gpus, margin, methods, lora_r, lora_targets, seq_lens, optimizer,
                         gradient_checkpointing, fmt) -> None:
    """`fit --task finetune`: one table per model."""
    from ..finetune_fit import fit_finetune
    from ..render import finetune as render

    setups = setups_from_options(methods, dtypes, lora_r, lora_targets, seq_lens, batches, optimizer,
                                 gradient_checkpointing)
    results = [fit_finetune(model, setups, gpus=split_list(gpus) or None, margin=margin) for model in models]
    if fmt != "table":
        formatter = {"json": render.fit_json, "csv": render.fit_csv, "markdown": render.fit_markdown}[fmt]
        click.echo("".join(formatter(result) for result in results) if fmt != "json" else
                   render.fit_json_many(results))
        return
    out = console()
    for result in results:
        out.print(render.fit_table(result))
        for line in render.fit_notes(result):
            out.print(line, highlight=False, markup=False, soft_wrap=True)


def refuse_finetune_options(task: str, methods, seq_lens) -> None:
    """Fine-tuning options given without --task finetune would be silently ignored: refuse them."""
    if task != "finetune" and (split_list(methods) or split_list(seq_lens)):
        raise UsageError("--method and --seq-len plan a fine-tune. Add --task finetune")
