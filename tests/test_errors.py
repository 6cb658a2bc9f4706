"""Errors: one `Error:` line, no blank line before it, a suggestion for a near miss, one exit code per kind."""

import json
import subprocess
import sys

import pytest
from click.testing import CliRunner

from falconbench.cli import cli
from falconbench.errors import EXIT_CODES, ConfigError, NotFoundError, ResultsError, UsageError, did_you_mean


def error_line(*args, exit_code):
    result = CliRunner().invoke(cli, list(map(str, args)), prog_name="falconbench")
    assert result.exit_code == exit_code, result.output
    assert result.output.startswith("Error: ") and result.output.count("\n") == 1, repr(result.output)
    return result.output


@pytest.mark.parametrize("args, suggestion", [
    (("plan", "-m", "falcon7b"), "Did you mean 'falcon-7b'"),
    (("plan", "-m", "smolm2"), "Did you mean 'smollm2'?"),
    (("fit", "-m", "falcon-7b", "-g", "A100"), "Did you mean 'A100-40GB' or 'A100-80GB'?"),
    (("plan", "-d", "int4"), "Did you mean 'int8'?"),
    (("plan", "--kv-dtype", "bf61"), "Did you mean 'bf16'?"),
    (("plan", "--device", "cdua"), "--device 'cdua' is not one of cuda, cpu. Did you mean 'cuda'? Example: --device cuda"),
    (("plna",), "no command 'plna'. Did you mean 'plan'?"),
    (("models", "get", "smolm2"), "Did you mean 'smollm2'?"),
])
def test_a_near_miss_names_what_was_meant(args, suggestion):
    assert suggestion in error_line(*args, exit_code=UsageError.exit_code)


def test_an_unknown_name_and_an_unknown_dtype_are_the_same_kind():
    assert error_line("plan", "-m", "nope", exit_code=2).startswith("Error: unknown model 'nope'.")
    assert error_line("plan", "-d", "nope", exit_code=2).startswith("Error: unknown dtype 'nope'.")


@pytest.mark.parametrize("command", ["plan", "fit", "run"])
def test_a_missing_path_is_said_to_be_missing(command, tmp_path):
    missing = tmp_path / "nonexistent" / "dir"
    out = error_line(command, "-m", missing, "--device", "cpu", exit_code=NotFoundError.exit_code)
    assert out == (f"Error: {missing}: no such file or folder. Check the path; --model takes a folder holding "
                   "config.json, a config.json path, a profile name or a cached hub id\n")


def test_a_malformed_config_and_an_unusable_results_folder_have_their_own_codes(tmp_path):
    (tmp_path / "config.json").write_text("{ not json")
    assert "is not valid JSON" in error_line("plan", "-m", tmp_path, exit_code=ConfigError.exit_code)
    run = tmp_path / "run"
    run.mkdir()
    (run / "results.jsonl").write_text("garbage\n")
    assert "no valid results row" in error_line("report", run, exit_code=ResultsError.exit_code)


def test_every_kind_has_its_own_documented_code():
    codes = [code for code, _ in EXIT_CODES]
    assert len(codes) == len(set(codes))
    kinds = {UsageError, NotFoundError, ConfigError, ResultsError}
    assert {kind.exit_code for kind in kinds} <= set(codes) and len({k.exit_code for k in kinds}) == len(kinds)


def test_did_you_mean_says_nothing_without_a_near_name():
    assert did_you_mean("zzzz", ["falcon-7b", "llama-7b"]) == ""
    assert did_you_mean("LLAMA-7B", ["falcon-7b", "llama-7b"]) == " Did you mean 'llama-7b'?"


def test_a_run_error_has_no_blank_line_before_it(tmp_path):
    """Through the real entry point and a pipe, where the progress display used to print an empty line first."""
    out = subprocess.run([sys.executable, "-m", "falconbench", "run", "-m", str(tmp_path / "gone"), "--device", "cpu"],
                         capture_output=True, text=True)
    assert out.returncode == NotFoundError.exit_code and out.stdout == ""
    assert out.stderr.startswith("Error: ") and out.stderr.count("\n") == 1, repr(out.stderr)


def test_click_usage_errors_are_one_line_too():
    out = error_line("plan", "--bogus", exit_code=2)
    assert out.startswith("Error: No such option '--bogus'") and "See 'falconbench plan --help'" in out
    assert json.loads(CliRunner().invoke(cli, ["plan", "-m", "falcon-7b", "-f", "JSON"]).output)  # case-insensitive
