"""The command line: a click group whose commands live one per module and load only when called."""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys

import click

from ..errors import INTERRUPTED_EXIT_CODE, UNEXPECTED_EXIT_CODE, FalconbenchError, UsageError, did_you_mean

# name -> (module, attribute, one-line help). Modules load lazily so `plan` never pays for `run`'s imports.
COMMANDS = {
    "plan": ("falconbench.cli.plan", "plan_command", "Exact weights and KV-cache memory for models, dtypes, "
             "contexts and batches."),
    "run": ("falconbench.cli.run", "run_command", "Load each dtype for real and measure memory, speed and "
            "quality."),
    "report": ("falconbench.cli.report", "report_command", "Tables and plots from one or more runs."),
    "fit": ("falconbench.cli.fit", "fit_command", "Which GPU, which dtype, how much context and batch."),
    "models": ("falconbench.cli.models", "models_group", "List profiles; fetch the bundled real model."),
}


class FalconbenchClickError(click.ClickException):
    """Shows a FalconbenchError as one `Error: ...` line with the error's exit code."""

    def __init__(self, error: FalconbenchError):
        super().__init__(str(error))
        self.exit_code = error.exit_code


class OneLineUsageError(click.ClickException):
    """click's own usage errors (an unknown option, a value not among the choices) as one `Error:` line."""

    exit_code = UsageError.exit_code

    def __init__(self, error: click.UsageError):
        message = error.format_message().rstrip(".")
        where = error.ctx.command_path if error.ctx is not None else "falconbench"
        super().__init__(f"{message}. See '{where} --help'")


class LazyGroup(click.Group):
    def list_commands(self, ctx):
        return [name for name in COMMANDS if self._available(name)]

    def get_command(self, ctx, name):
        if name not in COMMANDS or not self._available(name):
            return None
        module, attr, _ = COMMANDS[name]
        return getattr(importlib.import_module(module), attr)

    @staticmethod
    def _available(name: str) -> bool:
        return importlib.util.find_spec(COMMANDS[name][0]) is not None

    def format_commands(self, ctx, formatter):
        rows = [(name, COMMANDS[name][2]) for name in self.list_commands(ctx)]
        with formatter.section("Commands"):
            formatter.write_dl(rows)

    def resolve_command(self, ctx, args):
        name = args[0] if args else ""
        if name and not name.startswith("-") and self.get_command(ctx, name) is None:
            raise click.UsageError(f"no command {name!r}.{did_you_mean(name, self.list_commands(ctx))} Commands: "
                                   f"{', '.join(self.list_commands(ctx))}", ctx)
        return super().resolve_command(ctx, args)

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except FalconbenchError as error:
            raise FalconbenchClickError(error) from None
        except click.UsageError as error:
            raise OneLineUsageError(error) from None


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="falconbench")
def cli():
    """falconbench: plan and measure the GPU memory, speed and quality of Falcon-class LLMs, for inference and
    for fine-tuning (--task finetune on plan, fit and run).

    \b
    Start with:
      falconbench plan                       # the seed table: 7 models, bf16, 2048 tokens
      falconbench plan -m falcon-40b -d bf16,int8,nf4 -c 2048,8192
      falconbench fit -m falcon-7b --context 8192
      falconbench run -m smollm2 --device cpu  # measure a real model: bf16, fp16, int8, nf4
      falconbench report reports/<run folder>

    \b
    Fine-tuning (LoRA, QLoRA, full):
      falconbench plan --task finetune -m falcon-7b --method lora,qlora,full --seq-len 512
      falconbench fit --task finetune -m falcon-7b --method qlora --gradient-checkpointing -g T4
      falconbench run --task finetune -m smollm2 --method lora,full --seq-len 128 --device cpu
    """


def main(argv=None) -> None:
    """Console-script entry point: the one place where unexpected exceptions are caught."""
    try:
        cli.main(args=argv, prog_name="falconbench", standalone_mode=False)
    except click.UsageError as error:
        OneLineUsageError(error).show()
        sys.exit(UsageError.exit_code)
    except click.ClickException as error:
        error.show()
        sys.exit(error.exit_code)
    except click.exceptions.Exit as exit_:
        sys.exit(exit_.exit_code)
    except (click.exceptions.Abort, KeyboardInterrupt):
        click.echo("Aborted.", err=True)
        sys.exit(INTERRUPTED_EXIT_CODE)
    except Exception as error:  # noqa: BLE001 - the single catch-all, so users never see a traceback
        if os.environ.get("FALCONBENCH_DEBUG"):
            raise
        click.echo(f"Error: unexpected {type(error).__name__}: {error}. "
                   "Set FALCONBENCH_DEBUG=1 for the traceback and please report it.", err=True)
        sys.exit(UNEXPECTED_EXIT_CODE)
