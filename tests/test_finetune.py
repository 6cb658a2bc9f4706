"""The fine-tuning planner from first principles, against peft's own counts, and through the command line."""

import json
from dataclasses import replace

import pytest

from falconbench.cli import cli
from falconbench.errors import UsageError
from falconbench.finetune import (OPTIMIZERS, PEFT_DEFAULT_TARGETS, FinetuneSetup, full_tensor_sizes,
                                  plan_finetune_point, step_temporary_bytes, targeted_linears)
from falconbench.results import RunResult, append_result, append_row, read_results
from falconbench.sources import resolve_model
from falconbench.spec import spec_from_config
from tiny_models import TINY_FALCON, TINY_LLAMA

FALCON_7B = resolve_model("falcon-7b").spec()




def test_default_targets_are_peft_s():
    peft = pytest.importorskip("peft.utils.constants")
    mapping = peft.TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING
    for model_type, targets in PEFT_DEFAULT_TARGETS.items():
        assert tuple(mapping[model_type]) == targets, model_type


@pytest.mark.parametrize("config", [TINY_FALCON, TINY_LLAMA], ids=["falcon", "llama"])
@pytest.mark.parametrize("targets", [None, ("all-linear",)], ids=["default", "all-linear"])
def test_trainable_params_equal_peft_s_count(config, targets):
    torch = pytest.importorskip("torch")
    peft = pytest.importorskip("peft")
    from transformers import AutoConfig, AutoModelForCausalLM

    fields = dict(config)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(fields.pop("model_type"), **fields),
                                             dtype=torch.float32)
    lora = peft.LoraConfig(r=8, target_modules=list(targets) if targets and targets != ("all-linear",) else
                           (targets[0] if targets else None), task_type="CAUSAL_LM")
    model = peft.get_peft_model(model, lora)
    trainable, _ = model.get_nb_trainable_parameters()
    planned = plan_finetune_point(spec_from_config(config), FinetuneSetup("lora", lora_r=8, lora_targets=targets))
    assert planned.trainable_params == trainable


def test_doubling_the_rank_doubles_the_adapter_exactly():
    for targets in (None, ("all-linear",)):
        small = plan_finetune_point(FALCON_7B, FinetuneSetup("lora", lora_r=16, lora_targets=targets))
        large = plan_finetune_point(FALCON_7B, FinetuneSetup("lora", lora_r=32, lora_targets=targets))
        assert large.adapter_bytes == 2 * small.adapter_bytes
        assert large.trainable_params == 2 * small.trainable_params


def test_lora_params_are_rank_times_in_plus_out_per_targeted_linear():
    # Falcon-7B's fused query_key_value: 4544 -> 4544 + 2 x 64 (multi-query), 32 layers.
    row = plan_finetune_point(FALCON_7B, FinetuneSetup("lora", lora_r=16))
    assert row.trainable_params == 16 * (4544 + 4672) * 32 == 4_718_592
    assert row.adapter_bytes == 4 * row.trainable_params  # peft's fp32 adapters
    # The finetune-facts table: r=16 on all four linear types is 32,636,928 parameters (65.3 MB in 16 bits).
    four = plan_finetune_point(FALCON_7B, FinetuneSetup("lora", lora_r=16, lora_targets=("all-linear",)))
    assert four.trainable_params == 32_636_928


def test_full_finetuning_adamw_states_are_8_bytes_per_parameter():
    row = plan_finetune_point(FALCON_7B, FinetuneSetup("full", "bf16"))
    assert row.trainable_params == FALCON_7B.param_count == sum(full_tensor_sizes(FALCON_7B))
    assert row.optimizer_bytes == 8 * row.trainable_params
    assert row.trainable_bytes == row.gradient_bytes == 4 * row.trainable_params  # the fp32 master copy
    assert row.frozen_weights_bytes == 0
    pure = plan_finetune_point(FALCON_7B, FinetuneSetup("full", "fp32"))
    assert pure.weight_copy_bytes == 0 and pure.optimizer_bytes == row.optimizer_bytes


def test_eight_bit_and_sgd_states():
    eight = OPTIMIZERS["adamw-8bit"]
    assert eight.state_bytes(4096 * 16, 4) == 2 * (4096 * 16 + 4096 * 16 // 256 * 4)  # uint8 + an fp32 absmax per 256
    assert eight.state_bytes(100, 4) == 2 * 100 * 4  # under bitsandbytes' min_8bit_size: fp32 states
    assert plan_finetune_point(FALCON_7B, FinetuneSetup(optimizer="sgd")).optimizer_bytes == 0


def step_live_bytes(make_optimizer, shapes) -> int:
    """The most bytes of tensors torch allocates at once inside the second optimizer.step() (the first creates
    the state), counting none of the parameters, gradients and state it updates in place."""
    import torch

    from falconbench.run.live_tensors import LiveTensorPeak

    params = [torch.nn.Parameter(torch.randn(*shape)) for shape in shapes]
    optimizer = make_optimizer(params)
    for p in params:
        p.grad = torch.randn_like(p)
    optimizer.step()
    peak = LiveTensorPeak()
    existing = params + [p.grad for p in params] + [t for s in optimizer.state.values() for t in s.values()]
    peak.seen.update(t.untyped_storage().data_ptr() for t in existing)  # in place: not new
    with peak:
        optimizer.step()
    return peak.peak


@pytest.mark.parametrize("shapes", [[(64, 32), (300,), (128, 64), (7,)], [(128, 64), (7,), (300,), (64, 32)],
                                    [(48, 48), (64, 96), (5,)]])
def test_step_temporaries_are_what_torch_allocates_in_adamw_step(shapes):
    import math

    import torch

    sizes = [math.prod(s) for s in shapes]
    adamw = OPTIMIZERS["adamw"]
    # foreach (CUDA's default; forced here on CPU): every second moment's square root at once, exactly.
    foreach = step_live_bytes(lambda p: torch.optim.AdamW(p, lr=1e-3, foreach=True), shapes)
    assert foreach == step_temporary_bytes(adamw, sizes, 4, "cuda") == 4 * sum(sizes)
    # single-tensor (CPU's default): one tensor's sqrt and quotient beside the previous one's denom, bounded;
    # exact when the second largest tensor comes just before the largest.
    single = step_live_bytes(lambda p: torch.optim.AdamW(p, lr=1e-3), shapes)
    assert single == step_live_bytes(lambda p: torch.optim.AdamW(p, lr=1e-3, foreach=False), shapes)
    planned = step_temporary_bytes(adamw, sizes, 4, "cpu")
    largest = sizes.index(max(sizes))
    assert single <= planned and (single == planned) == (largest > 0 and sizes[largest - 1] == sorted(sizes)[-2])
    # SGD without momentum updates in place.
    assert step_live_bytes(lambda p: torch.optim.SGD(p, lr=1e-3), shapes) == 0
    assert step_temporary_bytes(OPTIMIZERS["sgd"], sizes, 4, "cuda") == 0


def test_the_optimizer_step_s_temporaries_can_set_the_total():
    full = plan_finetune_point(FALCON_7B, FinetuneSetup("full", "bf16", seq_len=512))
    assert full.step_temporary_bytes == full.trainable_bytes  # foreach: one more fp32 moment's bytes
    assert full.total_bytes == full.phase_peaks["optimizer"] > full.phase_peaks["backward"]
    cpu = plan_finetune_point(FALCON_7B, FinetuneSetup("full", "bf16", seq_len=512), device="cpu")
    assert cpu.step_temporary_bytes == 4 * (2 * FALCON_7B.embedding_params + max(
        n for n in full_tensor_sizes(FALCON_7B)[1:]))
    eight = plan_finetune_point(FALCON_7B, FinetuneSetup("full", "bf16", optimizer="adamw-8bit"))
    assert eight.step_temporary_bytes == 0


def test_checkpointing_keeps_about_one_layer_input_per_layer():
    for method in ("lora", "qlora", "full"):
        setup = FinetuneSetup(method, seq_len=512, batch=2)
        plain = plan_finetune_point(FALCON_7B, setup)
        checkpointed = plan_finetune_point(FALCON_7B, replace(setup, gradient_checkpointing=True))
        residual = 4 if method != "lora" else 2  # qlora and autocast keep an fp32 residual stream
        layer_inputs = FALCON_7B.num_layers * 512 * 2 * FALCON_7B.hidden_size * residual
        assert layer_inputs <= checkpointed.activation_bytes <= 1.05 * layer_inputs
        assert checkpointed.activation_bytes < plain.activation_bytes / 4
        assert checkpointed.recompute_bytes > 0 == plain.recompute_bytes


def test_qlora_base_is_4bit_linears_and_fp32_rest():
    """bitsandbytes' 4-bit layout per linear (packed pairs, an fp32 absmax per 64, the 16-entry codebook), and every
    other parameter in fp32 after prepare_model_for_kbit_training."""
    nf4 = plan_finetune_point(FALCON_7B, FinetuneSetup("qlora", "nf4"))
    sizes = [lin.in_features * lin.out_features for lin in FALCON_7B.layer_linears]
    linears = FALCON_7B.num_layers * sum(n // 2 + -(-n // 64) * 4 + 16 * 4 for n in sizes)
    floating = FALCON_7B.param_count - FALCON_7B.linear_params  # Falcon-7B's linears have no bias
    assert nf4.frozen_weights_bytes == linears + 4 * floating
    dq = plan_finetune_point(FALCON_7B, FinetuneSetup("qlora", "nf4-dq"))
    assert dq.frozen_weights_bytes < nf4.frozen_weights_bytes


@pytest.mark.parametrize("kwargs, message", [
    ({"method": "lora", "dtype": "nf4"}, "--method qlora"),
    ({"method": "qlora", "dtype": "bf16"}, "takes --dtype nf4"),
    ({"method": "sft"}, "unknown fine-tuning method"),
    ({"optimizer": "lion"}, "unknown optimizer"),
    ({"lora_r": 0}, "lora-r must be a positive integer"),
])
def test_setups_are_validated(kwargs, message):
    with pytest.raises(UsageError, match=message):
        FinetuneSetup(**kwargs)


def test_unknown_targets_are_refused_with_the_model_s_linears():
    with pytest.raises(UsageError, match="matches no linear.*query_key_value"):
        targeted_linears(FALCON_7B, ("q_proj",))


def test_plan_json_rows_carry_task_method_and_components(invoke):
    result = invoke("plan", "--task", "finetune", "-m", "falcon-7b", "--method", "lora,qlora,full",
                    "--seq-len", "512", "-f", "json")
    assert result.exit_code == 0, result.output
    rows = json.loads(result.output)
    assert [(r["task"], r["method"], r["dtype"]) for r in rows] == [
        ("finetune", "lora", "bf16"), ("finetune", "qlora", "nf4"), ("finetune", "full", "bf16")]
    for row in rows:
        parts = ("frozen_weights_bytes", "trainable_bytes", "weight_copy_bytes", "gradient_bytes", "optimizer_bytes",
                 "activation_bytes", "recompute_bytes", "logits_bytes", "logits_grad_bytes", "cuda_context_bytes")
        assert row["phase_peak_bytes"]["backward"] == sum(row[p] for p in parts)
        step = ("frozen_weights_bytes", "trainable_bytes", "gradient_bytes", "optimizer_bytes", "step_temporary_bytes",
                "cuda_context_bytes")
        assert row["phase_peak_bytes"]["optimizer"] == sum(row[p] for p in step)
        assert row["total_bytes"] == max(row["phase_peak_bytes"].values())
    assert rows[0]["trainable_params"] == 4_718_592 and rows[2]["adapter_bytes"] is None


def test_plan_table_and_option_errors(invoke):
    table = invoke("plan", "--task", "finetune", "-m", "falcon-7b", "--method", "qlora", "-d", "nf4-dq")
    assert table.exit_code == 0 and "qlora r=16 nf4-dq" in table.output and "Adapter on disk" in table.output
    alone = invoke("plan", "--method", "lora")
    assert alone.exit_code == 2 and "Add --task finetune" in alone.output
    wrong = invoke("plan", "--task", "finetune", "--method", "qlora", "-d", "bf16")
    assert wrong.exit_code == 2 and "suits none of --method qlora" in wrong.output


def test_fit_answers_the_source_post_s_setups(invoke):
    """Falcon-7B with QLoRA on a T4 16 GB; Falcon-40B with QLoRA on one A100 80 GB (seq 512, checkpointing)."""
    for model, gpu in (("falcon-7b", "T4"), ("falcon-40b", "A100-80GB")):
        result = invoke("fit", "--task", "finetune", "-m", model, "--method", "qlora,lora", "--seq-len", "512",
                        "--gradient-checkpointing", "-g", gpu, "-f", "json")
        assert result.exit_code == 0, result.output
        rows = {r["method"]: r for r in json.loads(result.output)}
        assert rows["qlora"]["fits"] and rows["qlora"]["recommended"] and rows["qlora"]["gpu"] == gpu
        assert not rows["lora"]["fits"] or model == "falcon-7b"
        assert rows["qlora"]["max_seq_len"] >= 512 and rows["qlora"]["tokens_per_second_bound"] > 0
    refused = invoke("fit", "--task", "finetune", "-m", "falcon-7b", "--calibrate", "x")
    assert refused.exit_code == 2 and "--task inference" in refused.output


def test_finetune_rows_stay_out_of_the_inference_reader(tmp_path):
    path = tmp_path / "results.jsonl"
    append_result(path, RunResult(model="m", dtype="bf16", status="ok"))
    append_row(path, {"task": "finetune", "model": "m", "dtype": "bf16", "status": "ok"})
    rows, problems = read_results(path)
    assert [r.model for r in rows] == ["m"] and not problems


def test_one_read_splits_a_results_file_by_task_and_reports_an_unknown_task(tmp_path):
    from falconbench.results import TASKS, read_finetune_rows, read_results_file

    path = tmp_path / "results.jsonl"
    append_result(path, RunResult(model="m", dtype="bf16", status="ok"))
    append_row(path, {"task": "finetune", "model": "f", "dtype": "bf16", "status": "ok"})
    append_row(path, {"task": "pretrain", "model": "p", "dtype": "bf16", "status": "ok"})
    read = read_results_file(path)
    assert [r.model for r in read.inference] == ["m"] and [r["model"] for r in read.finetune] == ["f"]
    assert [(p.line, p.reason) for p in read.problems] == [(3, "unknown task 'pretrain'; falconbench writes "
                                                               "inference, finetune")]
    assert read_results(path) == (read.inference, read.problems) and read_finetune_rows(tmp_path) == read.finetune
    assert read_finetune_rows(tmp_path / "none") == [] and TASKS == ("inference", "finetune")


def test_planning_a_finetune_never_imports_torch_or_peft():
    import subprocess
    import sys
    import textwrap

    code = textwrap.dedent("""
        import sys
        from falconbench.cli import main
        for args in (["plan", "--task", "finetune", "-m", "falcon-7b", "--method", "lora,qlora,full"],
                     ["fit", "--task", "finetune", "-m", "falcon-7b", "--method", "qlora", "-g", "T4"]):
            try:
                main(args + ["-f", "json"])
            except SystemExit as e:
                assert not e.code, e.code
        heavy = [m for m in ("torch", "transformers", "bitsandbytes", "peft", "numpy") if m in sys.modules]
        assert not heavy, heavy
    """)
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True)


def test_specs_the_planner_cannot_plan_exactly_are_refused():
    from types import SimpleNamespace

    from falconbench.finetune import refuse_unplannable

    def group(experts=(), float_params=0):
        return SimpleNamespace(experts=experts, linears=(), float_params=float_params)

    moe = SimpleNamespace(name="moe", groups=(group(("e",)),), caches=())
    hybrid = SimpleNamespace(name="hybrid", groups=(group(), group(float_params=8)), caches=())
    recurrent = SimpleNamespace(name="ssm", groups=(group(),), caches=((1, SimpleNamespace(kind="recurrent")),))
    for spec, reason in ((moe, "mixture-of-experts"), (hybrid, "several kinds"), (recurrent, "recurrent")):
        with pytest.raises(UsageError, match=reason):
            refuse_unplannable(spec)
    refuse_unplannable(FALCON_7B)
    refuse_unplannable(resolve_model("gemma-2-9b").spec())  # sliding and global layers, the same weights
