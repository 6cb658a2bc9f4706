"""docs/reference.md is the commands' own help, and the README's reference section their exit codes."""

from pathlib import Path

import pytest
from click.testing import CliRunner

from falconbench.cli import cli
from falconbench.cli.reference import HELP_WIDTH, REFERENCE_PATH, contexts, exit_codes_markdown, reference_markdown, \
    root_context

ROOT = Path(__file__).resolve().parent.parent


def test_the_reference_page_is_generated_from_the_commands():
    assert (ROOT / REFERENCE_PATH).read_text(encoding="utf-8") == reference_markdown(), \
        f"regenerate it: python -m falconbench.cli.reference > {REFERENCE_PATH}"


@pytest.mark.parametrize("path", [ctx.command_path for ctx in contexts(root_context())])
def test_each_section_is_what_help_prints(path):
    args = path.split()[1:]
    result = CliRunner().invoke(cli, [*args, "--help"], prog_name="falconbench", terminal_width=HELP_WIDTH)
    assert result.exit_code == 0
    page = (ROOT / REFERENCE_PATH).read_text(encoding="utf-8")
    assert f"## `{path}`\n\n```text\n{result.output}```" in page


def test_the_readme_lists_every_exit_code():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert exit_codes_markdown() in readme
