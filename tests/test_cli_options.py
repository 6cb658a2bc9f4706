"""The one vocabulary of options: every command spells, parses and defaults the shared options the same way."""

import json
from pathlib import Path

import click
import pytest

from falconbench.cli import cli

COMMANDS = ("plan", "fit", "run")
# option -> the commands that must take it (run measures prompt + new tokens, so it has no --context; its --attn
# takes a list, the matrix's attention-kernel axis, checked below)
SHARED = {"--model": COMMANDS, "--dtype": COMMANDS, "--context": ("plan", "fit"), "--batch": COMMANDS,
          "--kv-dtype": COMMANDS, "--attn": ("plan", "fit"), "--device": COMMANDS, "--format": COMMANDS}




def command(name: str) -> click.Command:
    return cli.get_command(click.Context(cli), name)


def option(name: str, flag: str) -> click.Option:
    [found] = [p for p in command(name).params if flag in p.opts]
    return found


def spelling(param: click.Option) -> tuple:
    """What a user sees and types: the flags, the metavar, multiple, the choices and the default."""
    choices = tuple(param.type.choices) if isinstance(param.type, click.Choice) else None
    return tuple(param.opts), param.metavar, param.multiple, choices, param.default, param.name


@pytest.mark.parametrize("flag", sorted(SHARED))
def test_every_command_spells_the_shared_option_the_same_way(flag):
    spellings = {name: spelling(option(name, flag)) for name in SHARED[flag]}
    assert len(set(spellings.values())) == 1, spellings


def test_the_formats_are_the_same_four_everywhere():
    for name in COMMANDS:
        assert list(option(name, "--format").type.choices) == ["table", "json", "csv", "markdown"]
        assert option(name, "--device").default == "cuda"
        assert option(name, "--kv-dtype").default == "auto"
    assert option("plan", "--attn").default == option("fit", "--attn").default == "sdpa"


def test_run_takes_a_list_of_attention_kernels_with_the_same_choices():
    attn = option("run", "--attn")
    assert attn.multiple and attn.metavar == "A[,A...]"
    assert attn.process_value(click.Context(command("run")), ("sdpa,eager",)) == ["sdpa", "eager"]
    assert attn.process_value(click.Context(command("run")), ()) == [option("plan", "--attn").default]
    with pytest.raises(Exception, match="not an attention kernel"):
        attn.process_value(click.Context(command("run")), ("flash",))


def test_fit_takes_a_comma_list_of_models_and_answers_each(invoke):
    result = invoke("fit", "-m", "falcon-7b,llama-7b", "-d", "bf16", "-g", "A100-80GB", "-f", "json")
    assert result.exit_code == 0, result.output
    assert [(r["model"], r["gpu"]) for r in json.loads(result.output)] == [("falcon-7b", "A100-80GB"),
                                                                          ("llama-7b", "A100-80GB")]
    table = invoke("fit", "-m", "falcon-7b", "-m", "llama-7b", "-d", "bf16", "-g", "A100-80GB").output
    assert "falconbench fit: falcon-7b" in table and "falconbench fit: llama-7b" in table


@pytest.mark.parametrize("name", ["plan", "fit"])
def test_k_suffixed_counts_and_repeated_lists_mean_the_same_in_plan_and_fit(invoke, name):
    args = [name, "-m", "falcon-7b", "-d", "bf16", "-c", "2048,8k", "-c", "32K", "-b", "1,2", "-f", "json"]
    rows = json.loads(invoke(*args, *(["-g", "H100-80GB"] if name == "fit" else [])).output)
    assert sorted({(r["context"], r["batch"]) for r in rows}) == [(c, b) for c in (2048, 8192, 32768) for b in (1, 2)]


def test_fit_takes_kv_dtype_attn_and_device_as_plan_does(invoke):
    def totals(name, *extra):
        args = [name, "-m", "falcon-7b", "-d", "bf16", "-c", "4k", *extra, "-f", "json"]
        rows = json.loads(invoke(*args, *(["-g", "H100-80GB"] if name == "fit" else [])).output)
        return [(r["kv_cache_bytes"], r["total_bytes"]) for r in rows]

    for extra in ([], ["--kv-dtype", "fp32"], ["--attn", "eager"], ["--device", "cpu"]):
        assert totals("plan", *extra) == totals("fit", *extra), extra
    assert totals("plan", "--kv-dtype", "fp32")[0][0] == 2 * totals("plan")[0][0]
    assert totals("plan", "--attn", "eager")[0][1] > totals("plan")[0][1]
    assert totals("plan", "--device", "cpu")[0][1] == totals("plan")[0][1] - 512 * 2**20


@pytest.mark.parametrize("args, message", [
    (("-b", "0"), "Error: --batch must be a positive integer (8k = 8192), got '0'. Example: --batch 1,8"),
    (("-c", "2k5"), "Error: --context must be a positive integer (8k = 8192), got '2k5'. Example: --context 2048,8k"),
    (("-c", "1_0_"), "Error: --context must be a positive integer (8k = 8192), got '1_0_'."),
    (("-b", ""), "Error: --batch was given an empty value. Example: --batch 1,8"),
    (("-d", ","), "Error: --dtype was given an empty value. Example: --dtype bf16,int8,nf4"),
])
@pytest.mark.parametrize("name", ["plan", "fit"])
def test_errors_give_an_example_of_the_option_that_was_wrong(invoke, name, args, message):
    result = invoke(name, "-m", "falcon-7b", *args)
    assert result.exit_code == 2 and result.output.startswith(message), result.output
    assert len(result.output.strip().splitlines()) == 1


@pytest.fixture
def captured_run(monkeypatch, tmp_path):
    """`run`'s options as they reach the core: one typed RunSettings, with no sweep started."""
    import falconbench.run as run_package

    calls = []

    def fake_run(settings, on_event=None, report=False):
        calls.append(settings)
        raise SystemExit(0)

    monkeypatch.setattr(run_package, "run_benchmark", fake_run)
    return calls


def test_run_parses_counts_and_lists_as_plan_does(invoke, captured_run, tmp_path):
    result = invoke("run", "-m", "falcon-7b", "--random-weights", "-d", "bf16,int8", "-d", "nf4", "--device", "cpu",
                    "--prompt-tokens", "1k,2k", "--new-tokens", "32", "-b", "2,8", "--attn", "eager",
                    "-o", str(tmp_path))
    assert result.exit_code == 0, result.output
    [settings] = captured_run
    assert (settings.model, settings.dtypes) == ("falcon-7b", ("bf16", "int8", "nf4"))
    assert (settings.prompt_tokens, settings.batches, settings.attns, settings.device) == ((1024, 2048), (2, 8),
                                                                                          ("eager",), "cpu")


@pytest.mark.parametrize("args, message", [
    (("-b", "0"), "Example: --batch 1,8"),
    (("--prompt-tokens", "8x"), "Example: --prompt-tokens 128,1k"),
    (("--kv-dtype", "fp8"), "--kv-dtype fp8 applies to plan and fit only"),
])
def test_run_refuses_bad_shared_values_before_any_work(invoke, captured_run, args, message):
    result = invoke("run", "-m", "falcon-7b", "--random-weights", *args)
    assert result.exit_code == 2 and message in result.output and not captured_run, result.output


@pytest.mark.parametrize("fmt, first_line", [("csv", "task,run,model,dtype"), ("markdown", "# ")])
def test_run_formats_csv_and_markdown_are_the_reports_tables(fmt, first_line):
    from types import SimpleNamespace

    from falconbench import api
    from falconbench.cli.run import machine_output

    recorded = Path(__file__).parent / "data" / "smollm2-cpu"
    rows, _ = api.read_results(recorded)
    text = machine_output(fmt, SimpleNamespace(rows=rows, output_dir=recorded))
    assert text.startswith(first_line) and all(dtype in text for dtype in ("bf16", "fp16", "int8", "nf4"))
