"""Rendering of `falconbench run` (exact tables on pinned width, no colour) and its command line."""

import io
import json

import pytest
from click.testing import CliRunner
from rich.console import Console

from falconbench.cli import cli
from falconbench.render.run import JSON_FIELDS, run_json
from falconbench.results import RunResult

SETTINGS = {"prompt_tokens": 16, "new_tokens": 8, "batch": 1, "repeats": 3, "attn_impl": "sdpa", "cached_tokens": 23}
BANDWIDTH = {"copy_bandwidth": {"bytes_per_second": 10e9, "method": "torch copy_"}}


def row(dtype, status, settings=None, **fields):
    from falconbench.results import settings_hash

    settings = {**SETTINGS, **(settings or {})}
    return RunResult(model="tiny", dtype=dtype, status=status, device="cpu", settings=settings,
                     environment={"cpu": "Test CPU", **BANDWIDTH}, config_hash=settings_hash(dtype, settings),
                     **fields)


def plan(weights, kv, total, activations=2048, scores=0, logits=1024):
    return {"weights_bytes": weights, "kv_cache_bytes": kv, "total_bytes": total, "activation_bytes": activations,
            "attention_scores_bytes": scores, "logits_bytes": logits}


ROWS = [
    row("bf16", "ok", weights_bytes=755328, plan=plan(755200, 5888, 844800), kv_cache_bytes=5888,
        peak_memory_bytes=16 * 2**20, quantized_layers=0, linear_layers=8, load_seconds=0.25, ttft_seconds=0.004,
        decode_tokens_per_second=250.0, memory={"prefill_runtime_bytes": 4096, "decode_runtime_bytes": -1024},
        latency={"ttft_seconds": {"p90": 0.005}, "decode_token_seconds": {"median": 0.004, "p90": 0.0045,
                                                                            "cv": 0.1}}),
    row("nf4", "ok", weights_bytes=261248, plan=plan(261120, 5888, 350592), kv_cache_bytes=5888,
        peak_memory_bytes=12 * 2**20, quantized_layers=8, linear_layers=8, load_seconds=0.5, ttft_seconds=0.008,
        decode_tokens_per_second=125.0, memory={"prefill_runtime_bytes": 2048, "decode_runtime_bytes": 0},
        latency={"ttft_seconds": {"p90": 0.009}, "decode_token_seconds": {"median": 0.008, "p90": 0.009,
                                                                            "cv": 0.05}}),
    row("int8", "oom", error="RuntimeError: [enforce fail] can't allocate memory", plan=plan(418816, 5888, 508288)),
]

EXPECTED = """\
run: Test CPU, 3 row(s) from RUN
Memory

  Dtype   Status     Weights    Δplan   KV cache   Δplan     Peak   Plan total      Δplan   Quantized
 ─────────────────────────────────────────────────────────────────────────────────────────────────────
  bf16    ok       737.6 KiB   +128 B    5.8 KiB   exact   16 MiB      825 KiB   +1885.9%         0/8
  nf4     ok       255.1 KiB   +128 B    5.8 KiB   exact   12 MiB    342.4 KiB   +3489.0%         8/8
  int8    oom              -        -          -       -        -    496.4 KiB          -           -

Runtime estimates against measured

  Dtype   Status   Activations*   Scores*   Logits*   Planned   Prefill    Δplan   Decode
 ─────────────────────────────────────────────────────────────────────────────────────────
  bf16    ok              2 KiB       0 B     1 KiB     3 KiB     4 KiB   +33.3%   −1 KiB
  nf4     ok              2 KiB       0 B     1 KiB     3 KiB     2 KiB   -33.3%      0 B
  int8    oom             2 KiB       0 B     1 KiB     3 KiB         -        -        -

Speed

  Dtype   Status       Load     TTFT   TTFT p90     Step   Step p90   Step CV   Decode tok/s      Bound   Share
 ───────────────────────────────────────────────────────────────────────────────────────────────────────────────
  bf16    ok       250.0 ms   4.0 ms     5.0 ms   4.0 ms     4.5 ms     10.0%          250.0   13,152.4    1.9%
  nf4     ok       500.0 ms   8.0 ms     9.0 ms   8.0 ms     9.0 ms      5.0%          125.0   37,560.1    0.3%
  int8    oom             -        -          -        -          -         -              -          -       -

"""


def render(rows, width=130):
    """What `run` and `report` print for these rows (the caption aside, checked on its own)."""
    from falconbench.render.report import report_tables, run_lines
    from falconbench.report import comparison_of

    comparison = comparison_of([("run", "RUN", "RUN", rows, [])])
    console = Console(file=io.StringIO(), width=width, color_system=None)
    for line in run_lines(comparison):
        console.print(line, markup=False, highlight=False)
    for table in report_tables(comparison):
        console.print(table)
    return "\n".join(line.rstrip() for line in console.file.getvalue().splitlines()) + "\n"


def caption(rows):
    from falconbench.render.rows import caption_lines
    from falconbench.report import comparison_of

    return "\n".join(caption_lines(comparison_of([("run", "RUN", "RUN", rows, [])])))


def test_tables_show_every_scheme_with_its_plan():
    assert render(ROWS) == EXPECTED
    text = caption(ROWS)
    assert "Peak: peak resident memory (RSS) above the baseline while the point ran." in text
    assert "int8 sdpa prompt 16 + 8 × batch 1: oom: RuntimeError: [enforce fail] can't allocate memory" in text


def test_the_shape_axes_that_vary_get_columns():
    from dataclasses import replace

    longer = replace(ROWS[0], settings={**SETTINGS, "prompt_tokens": 2048}, config_hash="long")
    text = render([ROWS[0], longer])
    assert "Prompt" in text and "Batch" not in text and "Attn" not in text
    eager = replace(ROWS[0], settings={**SETTINGS, "attn_impl": "eager"}, config_hash="eager")
    assert "eager" in render([ROWS[0], eager])


def test_noisy_timings_are_flagged():
    from dataclasses import replace

    noisy = replace(ROWS[1], latency={"decode_token_seconds": {"median": 0.01, "p90": 0.02, "cv": 0.6}})
    assert "Warning: step CV above 25% (nf4): noisy timings" in caption([ROWS[0], noisy])
    assert "noisy" not in caption(ROWS[:2])


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
    assert "Peak: NVML's device use above the baseline" in caption(cuda)
    no_nvml = [replace(r, memory={"peak_source": "torch peak reserved (no NVML)"}) for r in cuda]
    text = caption(no_nvml)
    assert "Peak: torch's peak reserved (no NVML" in text and "NVML's device use" not in text


def test_quality_is_one_row_per_scheme_and_its_delta_is_relative():
    from dataclasses import replace

    quality = {"reference": "fp32", "reference_perplexity": 10.0, "greedy_tokens": 32, "delta_relative": 0.05,
               "delta_ci_low": 0.4, "delta_ci_high": 0.6, "divergence_position": 3, "divergence_is_tie": True}
    rows = [replace(ROWS[1], perplexity=10.5, kl_divergence=0.01, top1_agreement=0.9, quality=quality),
            replace(ROWS[1], perplexity=10.5, kl_divergence=0.01, top1_agreement=0.9, quality=quality,
                    settings={**SETTINGS, "batch": 4}, config_hash="batch 4"),
            replace(ROWS[1], settings={**SETTINGS, "attn_impl": "eager"}, config_hash="eager")]  # no quality
    text = render(rows)
    assert text.count("+5.0% [+4.0, +6.0]") == 1  # one scheme, two points and two kernels: one quality row
    assert "token 3 (tie)" in text
    assert "Δ PPL % is (perplexity − the reference's) / the reference's" in caption(rows)
