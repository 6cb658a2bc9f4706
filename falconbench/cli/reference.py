"""docs/reference.md, generated from the click commands themselves, so the help and the docs cannot drift.

Regenerate with `python -m falconbench.cli.reference > docs/reference.md`; tests/test_docs.py fails when the file
differs from what this prints.
"""

from __future__ import annotations

import click

from ..errors import EXIT_CODES

HELP_WIDTH = 100  # the width the help is laid out at in the page (the group's max_content_width)
REFERENCE_PATH = "docs/reference.md"


def contexts(ctx: click.Context) -> list[click.Context]:
    """A context for `ctx`'s command and for every command under it, depth first (as `--help` would build them,
    so they inherit the group's settings: -h, the width)."""
    found = [ctx]
    command = ctx.command
    if isinstance(command, click.Group):
        for name in command.list_commands(ctx):
            found += contexts(click.Context(command.get_command(ctx, name), info_name=name, parent=ctx))
    return found


def root_context() -> click.Context:
    from . import cli

    return click.Context(cli, info_name="falconbench", terminal_width=HELP_WIDTH, **cli.context_settings)


def exit_codes_markdown() -> str:
    rows = ["| Code | Meaning |", "| ---: | --- |"] + [f"| {code} | {meaning} |" for code, meaning in EXIT_CODES]
    return "\n".join(rows) + "\n"


def reference_markdown() -> str:
    parts = ["# falconbench command reference", "",
             f"Generated from the commands' own help by `python -m falconbench.cli.reference > {REFERENCE_PATH}`; "
             "a test fails when this page and `--help` differ.", "",
             "Every list option takes a comma list and may repeat (`-d bf16,int8 -d nf4`); token counts and batches "
             "take a k suffix (`8k` = 8192).", ""]
    for ctx in contexts(root_context()):
        parts += [f"## `{ctx.command_path}`", "", "```text", ctx.get_help(), "```", ""]
    parts += ["## Exit codes", "", exit_codes_markdown()]
    return "\n".join(parts)


if __name__ == "__main__":
    print(reference_markdown(), end="")
