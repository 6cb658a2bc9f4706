"""`falconbench run` end to end: spawned workers on tiny Falcon and Llama models, all four schemes, on CPU.

One sweep per model, shared by the module's tests (each configuration is a fresh process, so this is the slow
part of the suite: keep the models tiny and the token counts small).
"""

import json
import signal

import pytest
from click.testing import CliRunner

pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("bitsandbytes")

from falconbench.cli import cli  # noqa: E402
from falconbench.results import read_results  # noqa: E402
from falconbench.run import RunConfig, run_sweep  # noqa: E402
from falconbench.run.orchestrator import death_message  # noqa: E402
from tiny_models import TINY_FALCON, write_config  # noqa: E402

pytestmark = pytest.mark.slow
DTYPES = ["bf16", "fp16", "int8", "nf4"]
SMALL = ["--device", "cpu", "--prompt-tokens", "8", "--new-tokens", "4", "--repeats", "2", "--warmup", "1",
         "--reference", "bf16"]
REQUIRED = ("model", "dtype", "status", "error", "weights_bytes", "plan", "kv_cache_bytes",
            "peak_memory_bytes", "load_seconds", "ttft_seconds", "decode_tokens_per_second", "quantized_layers",
            "linear_layers")


@pytest.fixture(scope="module", autouse=True)
def one_thread_per_worker():
    """Workers inherit the environment: one thread each keeps tiny models fast on a busy 2-core machine."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("OMP_NUM_THREADS", "1")
        yield


@pytest.fixture(scope="module")
def sweeps(tmp_path_factory, tiny_falcon_dir, tiny_llama_config):
    """Falcon from a saved folder (transformers' loader), Llama from its config (random weights)."""
    runs = {}
    for name, model_args in (("falcon", ["-m", str(tiny_falcon_dir)]),
                             ("llama", ["-m", str(tiny_llama_config), "--random-weights"])):
        folder = tmp_path_factory.mktemp(f"run-{name}")
        result = CliRunner().invoke(cli, ["run", *model_args, "-d", ",".join(DTYPES), *SMALL, "-o", str(folder),
                                          "--format", "json"], catch_exceptions=False)
        assert result.exit_code == 0, result.output
        runs[name] = (json.loads(result.stdout), folder)
    return runs


@pytest.mark.parametrize("name", ["falcon", "llama"])
def test_every_scheme_runs(sweeps, name):
    rows, _ = sweeps[name]
    assert [r["dtype"] for r in rows] == DTYPES
    assert [r["status"] for r in rows] == ["ok"] * 4, [r["error"] for r in rows]
    for row in rows:
        assert all(field in row for field in REQUIRED)
        assert row["error"] is None and row["peak_memory_bytes"] > 0 and row["load_seconds"] > 0
        assert row["ttft_seconds"] > 0 and row["decode_tokens_per_second"] > 0


@pytest.mark.parametrize("name, linears", [("falcon", 8), ("llama", 14)])
def test_quantized_rows_are_quantized_and_smaller(sweeps, name, linears):
    rows = {r["dtype"]: r for r in sweeps[name][0]}
    for dtype in ("bf16", "fp16"):
        assert (rows[dtype]["quantized_layers"], rows[dtype]["linear_layers"]) == (0, linears)
    for dtype in ("int8", "nf4"):
        assert rows[dtype]["quantized_layers"] == rows[dtype]["linear_layers"] == linears
    # Tiny models are embedding-heavy (the embeddings and Llama's separate head stay 16-bit), so the ratios are
    # milder than a 7B model's 0.5 and 0.3; they are still far from 1.
    assert rows["int8"]["weights_bytes"] < 0.65 * rows["bf16"]["weights_bytes"]
    assert rows["nf4"]["weights_bytes"] < 0.45 * rows["bf16"]["weights_bytes"]


def test_falcon_quantization_was_done_by_falconbench(sweeps):
    rows = {r["dtype"]: r for r in sweeps["falcon"][0]}
    for dtype in ("int8", "nf4"):
        by = rows[dtype]["memory"]["quantized_by"]
        assert by["transformers"] + by["falconbench"] == 8


@pytest.mark.parametrize("name", ["falcon", "llama"])
def test_plan_beside_measurement(sweeps, name):
    for row in sweeps[name][0]:
        plan = row["plan"]
        error = abs(plan["weights_bytes"] - row["weights_bytes"]) / row["weights_bytes"]
        assert error <= 0.03, (row["dtype"], error)
        assert plan["kv_cache_bytes"] == row["kv_cache_bytes"]
        assert row["memory"]["kv_cache_tokens"] == 8 + 4 - 1
        assert plan["total_bytes"] >= plan["weights_bytes"] + plan["kv_cache_bytes"]
        assert (plan["context"], plan["batch"], plan["attn_impl"]) == (8 + 4 - 1, 1, "sdpa")


@pytest.mark.parametrize("name", ["falcon", "llama"])
def test_rows_are_appended_with_settings_environment_and_detail(sweeps, name):
    json_rows, folder = sweeps[name]
    rows, problems = read_results(folder)
    assert not problems and [r.as_dict() for r in rows] == json_rows
    assert len({r.config_hash for r in rows}) == 4
    assert (folder / "worker.log").is_file()
    for row in rows:
        assert row.settings["prompt_tokens"] == 8 and row.settings["new_tokens"] == 4
        assert row.settings["device"] == "cpu" and row.device == "cpu"
        for key in ("python", "torch", "transformers", "bitsandbytes", "accelerate", "cpu"):
            assert row.environment[key], key
        assert set(row.memory["phases"]) == {"load", "prefill", "decode"}
        assert row.latency["ttft_seconds"]["n"] == 2
        assert row.latency["decode_token_seconds"]["n"] == 2 * 3
        assert row.ttft_seconds == row.latency["ttft_seconds"]["median"]
        # no tokenizer in the tiny Falcon's folder, random weights for the Llama: quality skipped, saying why
        assert row.perplexity is None
        assert ("tokenizer" if name == "falcon" else "random weights") in row.quality["skipped"]
    quantization = {r.dtype: r.settings["quantization"] for r in rows}
    assert quantization["bf16"] is None
    assert quantization["int8"]["llm_int8_threshold"] == 6.0
    assert quantization["nf4"]["bnb_4bit_quant_type"] == "nf4"
    assert quantization["nf4"]["bnb_4bit_compute_dtype"] == "bfloat16"


def test_failures_get_their_status_and_the_sweep_goes_on(tmp_path, tiny_falcon_config):
    """An impossible model (a 256 TiB embedding) is oom, an unbuildable one is error, the next one still runs."""
    huge = write_config(tmp_path / "huge", {**TINY_FALCON, "vocab_size": 2**40})
    legacy = write_config(tmp_path / "legacy", {**TINY_FALCON, "model_type": "refinedwebmodel"})
    configs = [RunConfig(str(folder), "bf16", random_weights=True, prompt_tokens=4, new_tokens=2, repeats=1,
                         warmup=0) for folder in (huge, legacy, tiny_falcon_config)]
    events = []
    rows = run_sweep(configs, tmp_path / "out", events.append)
    assert [r.status for r in rows] == ["oom", "error", "ok"]
    assert "can't allocate memory" in rows[0].error
    assert rows[0].planned_weights_bytes > 2**48  # the plan is there even when the run could not be
    assert "refinedwebmodel" in rows[1].error and "transformers" in rows[1].error
    written, _ = read_results(tmp_path / "out")
    assert [r.status for r in written] == ["oom", "error", "ok"]
    assert [e.kind for e in events if e.kind != "phase"] == ["start", "done"] * 3
    assert any(e.phase == "load" for e in events if e.kind == "phase")


def test_a_killed_worker_is_explained(tmp_path):
    assert "SIGKILL" in death_message(-signal.SIGKILL, tmp_path / "worker.log")
    assert "out-of-memory killer" in death_message(-signal.SIGKILL, tmp_path / "worker.log")
    assert "SIGSEGV" in death_message(-signal.SIGSEGV, tmp_path / "worker.log")
    assert "exited with code 3" in death_message(3, tmp_path / "worker.log")
