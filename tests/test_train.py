"""Real training steps on the tiny test models: each measured component against the plan, and `run --task finetune`."""

import json

import pytest
from click.testing import CliRunner

from falconbench.data import EVAL_TEXT
from falconbench.finetune import FinetuneSetup, plan_finetune_point
from falconbench.render.console import reset_consoles
from falconbench.sources import resolve_model

pytest.importorskip("peft")
pytest.importorskip("torch")

EXACT = ("trainable_params", "trainable_bytes", "weight_copy_bytes", "gradient_bytes", "optimizer_bytes",
         "logits_grad_bytes")


def measure(folder, setup, tmp_path=None):
    from falconbench.train.measure import StepSettings, measure_finetune

    return measure_finetune(folder, setup, StepSettings(steps=2, warmup=0), EVAL_TEXT, output_dir=tmp_path)


def planned(folder, setup):
    return plan_finetune_point(resolve_model(str(folder)).spec(), setup, device="cpu")


@pytest.mark.parametrize("method", ["lora", "qlora", "full"])
@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "ckpt"])
def test_tiny_falcon_components_match_the_plan(tiny_falcon_dir, tmp_path, method, checkpointing):
    setup = FinetuneSetup(method, seq_len=64, gradient_checkpointing=checkpointing)
    fields, plan = measure(tiny_falcon_dir, setup, tmp_path), planned(tiny_falcon_dir, setup)
    for name in EXACT:
        assert fields[name] == getattr(plan, name), name
    # The base's frozen tensors, plus its non-persistent buffers (rotary inv_freq), which the planner leaves out.
    assert 0 <= fields["frozen_weights_bytes"] - plan.frozen_weights_bytes <= 1024
    assert fields["activation_bytes"] == pytest.approx(plan.activation_bytes, rel=0.02)
    assert fields["logits_bytes"] == pytest.approx(plan.logits_bytes, rel=0.01)
    assert fields["recompute_bytes"] == pytest.approx(plan.recompute_bytes, rel=0.1, abs=1)
    assert fields["losses"][-1] < fields["losses"][0]
    if setup.adapters:  # the adapter on disk: exactly the planned tensor bytes plus the safetensors header
        assert fields["adapter_bytes"] == plan.adapter_bytes
        assert fields["adapter_file_bytes"] == plan.adapter_bytes + fields["adapter_header_bytes"]


def test_checkpointing_keeps_about_one_layer_input_per_layer_measured(tiny_llama_dir):
    plain = measure(tiny_llama_dir, FinetuneSetup("lora", seq_len=64))
    checkpointed = measure(tiny_llama_dir, FinetuneSetup("lora", seq_len=64, gradient_checkpointing=True))
    spec = resolve_model(str(tiny_llama_dir)).spec()
    layer_inputs = spec.num_layers * 64 * spec.hidden_size * 2  # bf16 hidden states at each layer's entrance
    assert layer_inputs <= checkpointed["activation_bytes"] <= layer_inputs + 64 * spec.hidden_size * 4 + 64 * 4
    assert checkpointed["activation_bytes"] < plain["activation_bytes"] / 4
    assert checkpointed["losses"] == pytest.approx(plain["losses"], rel=1e-3)  # the same training, recomputed


def test_eight_bit_optimizer_state_matches_the_plan(tiny_llama_dir):
    setup = FinetuneSetup("lora", seq_len=32, optimizer="adamw-8bit", lora_targets=("all-linear",))
    fields, plan = measure(tiny_llama_dir, setup), planned(tiny_llama_dir, setup)
    assert fields["optimizer_bytes"] == plan.optimizer_bytes


def test_run_task_finetune_prints_the_report_s_view_writes_rows_and_resumes(tiny_falcon_dir, tmp_path, monkeypatch):
    from falconbench.cli import cli
    from falconbench.results import read_results

    monkeypatch.setenv("NO_COLOR", "1")
    monkeypatch.setenv("COLUMNS", "80")
    reset_consoles()
    args = ["run", "--task", "finetune", "-m", str(tiny_falcon_dir), "--method", "lora", "--seq-len", "32",
            "--device", "cpu", "--repeats", "2", "--warmup", "1", "-o", str(tmp_path)]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    reset_consoles()
    report = CliRunner().invoke(cli, ["report", str(tmp_path)])
    assert report.exit_code == 0, report.output
    assert result.stdout == report.stdout  # one view: run prints exactly the tables report prints of its rows
    assert "Fine-tuning steps" in result.stdout and "Peak: backward" in result.stdout
    memory = result.stdout[result.stdout.index("Fine-tuning memory:"):]
    for component in ("Trainable params", "Gradients", "Optimizer states"):
        line = next(line for line in memory.splitlines() if line.strip().startswith(component))
        assert line.rstrip().endswith("exact"), line
    assert read_results(tmp_path) == ([], [])  # the inference reader leaves fine-tuning rows alone
    again = CliRunner().invoke(cli, args)
    assert again.exit_code == 2 and "--resume" in again.output
    resumed = CliRunner().invoke(cli, args + ["--resume", "-f", "json"])  # nothing left to measure
    assert resumed.exit_code == 0 and len((tmp_path / "results.jsonl").read_text().splitlines()) == 1
    rows = json.loads(resumed.stdout)
    assert len(rows) == 1 and rows[0]["task"] == "finetune" and rows[0]["status"] == "ok", rows
    from falconbench import __version__

    assert rows[0]["falconbench_version"] == __version__  # as inference rows record it
    assert f"falconbench {__version__}" in result.stdout  # the report's settings line says it
    measured, plan = rows[0]["measured"], rows[0]["planned"]
    assert measured["trainable_params"] == plan["trainable_params"] and len(measured["step_seconds"]) == 2
    assert measured["peak_memory_bytes"] > 0 and set(measured["memory"]["phases"]) == {"forward", "backward",
                                                                                         "optimizer"}
    reset_consoles()


@pytest.mark.parametrize("method", ["lora", "qlora"])
def test_gpt2_conv1d_trains_with_fan_in_fan_out_as_peft_wants_it(tmp_path, method):
    """GPT-2 keeps its linears as transformers' Conv1D (in × out): LoRA adapts them with fan_in_fan_out=True, which
    the measuring path sets itself, so peft has nothing to correct (it would warn); a 4-bit base has none left."""
    import warnings

    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=64, n_head=2, n_positions=128, vocab_size=256)).save_pretrained(
        tmp_path / "gpt2")
    setup = FinetuneSetup(method, seq_len=32)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fields = measure(tmp_path / "gpt2", setup, tmp_path / "adapter")
    assert not [w for w in caught if "fan_in_fan_out" in str(w.message)]
    saved = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert saved["fan_in_fan_out"] is (method == "lora") and saved["target_modules"] == ["c_attn"]
    plan = planned(tmp_path / "gpt2", setup)
    assert fields["trainable_params"] == plan.trainable_params and fields["adapter_bytes"] == plan.adapter_bytes
    assert fields["losses"][-1] < fields["losses"][0]
