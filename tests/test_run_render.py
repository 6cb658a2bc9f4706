"""Rendering of `falconbench run` (exact tables on pinned width, no colour) and its command line."""

import io
import json

import pytest
from click.testing import CliRunner
from rich.console import Console

from falconbench.cli import cli
from falconbench.render.run import JSON_FIELDS, run_json, run_tables
from falconbench.results import RunResult

SETTINGS = {"prompt_tokens": 16, "new_tokens": 8, "batch": 1, "repeats": 3}


def row(dtype, status, **fields):
    return RunResult(model="tiny", dtype=dtype, status=status, device="cpu", settings=SETTINGS,
                     environment={"cpu": "Test CPU"}, **fields)


ROWS = [
    row("bf16", "ok", weights_bytes=755328, planned_weights_bytes=755200, kv_cache_bytes=5888,
        planned_kv_cache_bytes=5888, peak_memory_bytes=16 * 2**20, planned_total_bytes=844800, quantized_layers=0,
        linear_layers=8, load_seconds=0.25, ttft_seconds=0.004, decode_tokens_per_second=250.0,
        latency={"ttft_seconds": {"p90": 0.005}, "decode_token_seconds": {"p90": 0.0045, "cv": 0.1}}),
    row("nf4", "ok", weights_bytes=261248, planned_weights_bytes=261120, kv_cache_bytes=5888,
        planned_kv_cache_bytes=5888, peak_memory_bytes=12 * 2**20, planned_total_bytes=350592, quantized_layers=8,
        linear_layers=8, load_seconds=0.5, ttft_seconds=0.008, decode_tokens_per_second=125.0,
        latency={"ttft_seconds": {"p90": 0.009}, "decode_token_seconds": {"p90": 0.009, "cv": 0.05}}),
    row("int8", "oom", error="RuntimeError: [enforce fail] can't allocate memory", planned_weights_bytes=418816,
        planned_kv_cache_bytes=5888, planned_total_bytes=508288),
]

EXPECTED = """\
falconbench run: tiny on cpu (Test CPU), prompt 16 + 8 new tokens, batch 1, 3 repeats
 Dtype  Status  Quant.    Weights  ×bf16   Δplan  KV cache  Δplan    Peak  ×bf16    Planned     Δplan
──────────────────────────────────────────────────────────────────────────────────────────────────────
 bf16   ok         0/8  737.6 KiB  1.00×  +128 B   5.8 KiB  exact  16 MiB  1.00×    825 KiB  +1885.9%
 nf4    ok         8/8  255.1 KiB  0.35×  +128 B   5.8 KiB  exact  12 MiB  0.75×  342.4 KiB  +3489.0%
 int8   oom          -          -      -       -         -      -       -      -  496.4 KiB         -
 Dtype  Status      Load    TTFT  TTFT p90  ×bf16  Decode tok/s  ×bf16  Token p90  Token CV
────────────────────────────────────────────────────────────────────────────────────────────
 bf16   ok      250.0 ms  4.0 ms    5.0 ms  1.00×         250.0  1.00×     4.5 ms     10.0%
 nf4    ok      500.0 ms  8.0 ms    9.0 ms  2.00×         125.0  0.50×     9.0 ms      5.0%
 int8   oom            -       -         -      -             -      -          -         -
Δplan: (measured − planned) / planned, in bytes where a percentage would round to zero; Planned is the
planner's total (weights, KV cache, runtime estimate), set against the measured Peak.
Peak: peak RSS − baseline. TTFT (prefill) and Decode: medians over the repeats; Token: one decode step.
int8: oom: RuntimeError: [enforce fail] can't allocate memory
"""


def render(rows, width=110):
    console = Console(file=io.StringIO(), width=width, color_system=None)
    for table in run_tables(rows):
        console.print(table)
    return "\n".join(line.rstrip() for line in console.file.getvalue().splitlines()) + "\n"


def test_tables_compare_every_scheme_with_the_first():
    assert render(ROWS) == EXPECTED


def test_a_failed_reference_gives_no_ratios():
    text = render([ROWS[2], ROWS[0]])
    assert "×int8" in text and "1.00×" not in text


def test_noisy_timings_are_flagged():
    from dataclasses import replace

    noisy = replace(ROWS[1], latency={"decode_token_seconds": {"p90": 0.02, "cv": 0.6}})
    text = render([ROWS[0], noisy])
    assert "Token CV above 25% (nf4): noisy timings" in text
    assert "noisy" not in render(ROWS[:2])


def test_json_lists_the_required_fields_first():
    rows = json.loads(run_json(ROWS))
    assert [r["dtype"] for r in rows] == ["bf16", "nf4", "int8"]
    assert tuple(rows[0])[:len(JSON_FIELDS)] == JSON_FIELDS
    assert rows[2]["status"] == "oom" and rows[2]["weights_bytes"] is None
    assert RunResult.from_dict(rows[1]) == ROWS[1]


def test_help_shows_an_example():
    result = CliRunner().invoke(cli, ["run", "--help"], catch_exceptions=False)
    assert result.exit_code == 0 and "--random-weights" in result.output and "falconbench run -m" in result.output


@pytest.mark.parametrize("args, message", [
    (["-m", "falcon-7b"], "Pass --random-weights"),
    (["-m", "no-such-model", "--random-weights"], "unknown model"),
    (["-m", "falcon-7b", "--random-weights", "-d", "int9"], "unknown dtype"),
    (["-m", "falcon-7b", "--random-weights", "--repeats", "0"], "repeats must be a positive integer"),
])
def test_bad_options_are_one_error_line(args, message, tmp_path):
    result = CliRunner().invoke(cli, ["run", *args, "--device", "cpu", "-o", str(tmp_path / "out")])
    assert result.exit_code != 0 and message in result.output
    assert not (tmp_path / "out").exists()  # nothing ran, nothing written


def test_cuda_without_a_gpu_is_refused_up_front(tmp_path):
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    result = CliRunner().invoke(cli, ["run", "-m", "falcon-7b", "--random-weights", "--device", "cuda",
                                      "-o", str(tmp_path / "out")])
    assert result.exit_code == 2 and "sees no CUDA GPU" in result.output and "--device cpu" in result.output


def test_peak_names_its_source_on_cuda():
    from dataclasses import replace

    cuda = [replace(r, device="cuda", memory={"peak_source": "NVML device used - baseline"}) for r in ROWS[:2]]
    assert "Peak: NVML device used − pre-run baseline." in render(cuda, width=200)
    no_nvml = [replace(r, memory={"peak_source": "torch peak reserved (no NVML)"}) for r in cuda]
    text = render(no_nvml, width=200)
    assert "Peak: torch peak reserved (no NVML" in text and "NVML device used" not in text


def test_quality_table_says_its_delta_is_absolute():
    from dataclasses import replace

    quality = {"reference": "bf16", "scored_tokens": 511, "eval_text": "text", "token_hash": "abc", "window": 256,
               "stride": 128, "greedy_tokens": 32, "is_reference": False, "delta_perplexity": 0.5,
               "delta_ci_low": 0.4, "delta_ci_high": 0.6, "kl_p99": 0.2, "divergence_position": 3}
    rows = [replace(ROWS[0], perplexity=10.0, quality={**quality, "is_reference": True, "delta_perplexity": 0.0}),
            replace(ROWS[1], perplexity=10.5, kl_divergence=0.01, top1_agreement=0.9, quality=quality)]
    text = render(rows, width=200)
    assert "+0.500 [+0.400, +0.600]" in text
    assert "Δ PPL = perplexity − the reference's, absolute" in text
