"""`fit --task finetune`'s tokens/s bound from first principles: the FLOPs of a training step counted from the
model's own nn.Linear modules (built on the meta device), the compute bound from the card's peak, and the lower of
the compute and the bandwidth bound."""

import pytest

from falconbench.finetune import FinetuneSetup, plan_finetune_point
from falconbench.finetune_fit import bandwidth_tokens_per_second_bound, fit_finetune, training_flops_per_token
from falconbench.gpus import get_gpu, gpu_profiles
from falconbench.sources import resolve_model

SEQ = 512


@pytest.fixture(scope="module")
def falcon_7b():
    """Falcon-7B's spec, and the multiply-adds per token of every nn.Linear of the model transformers builds
    (the tied head included), split into the decoder layers' and the head's."""
    pytest.importorskip("torch")
    from accelerate import init_empty_weights
    from torch import nn
    from transformers import AutoConfig, AutoModelForCausalLM

    source = resolve_model("falcon-7b")
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(str(source.folder)))
    model.tie_weights()
    linears = {name: m.in_features * m.out_features for name, m in model.named_modules() if isinstance(m, nn.Linear)}
    head = linears.pop("lm_head")
    config = model.config
    attention = config.num_hidden_layers * SEQ * config.hidden_size  # L · s · d_attn (71 heads × 64)
    return source.spec(), sum(linears.values()), head, attention


def test_full_fine_tuning_is_6n_plus_attention_and_checkpointing_adds_a_layer_forward(falcon_7b):
    spec, layers, head, attention = falcon_7b
    plain = plan_finetune_point(spec, FinetuneSetup("full", seq_len=SEQ))
    assert training_flops_per_token(spec, plain) == 6 * (layers + head) + 6 * attention  # Kaplan: 2N + 4N
    ckpt = plan_finetune_point(spec, FinetuneSetup("full", seq_len=SEQ, gradient_checkpointing=True))
    assert training_flops_per_token(spec, ckpt) == 6 * (layers + head) + 6 * attention + 2 * layers + 2 * attention


@pytest.mark.parametrize("method", ["lora", "qlora"])
def test_lora_skips_the_frozen_weights_gradients(falcon_7b, method):
    spec, layers, head, attention = falcon_7b
    for checkpointing in (False, True):
        row = plan_finetune_point(spec, FinetuneSetup(method, seq_len=SEQ, gradient_checkpointing=checkpointing))
        adapters = row.trainable_params  # peft's own count (tests/test_finetune.py)
        expected = 4 * (layers + head) + 6 * adapters + 6 * attention  # forward, input gradients; adapters' 6N
        if checkpointing:
            expected += 2 * (layers + adapters) + 2 * attention
        assert training_flops_per_token(spec, row) == expected


def test_the_bound_is_the_lower_of_compute_and_bandwidth_and_says_which():
    t4, h100 = get_gpu("T4"), get_gpu("H100-80GB")
    rows = {(r.gpu, r.seq_len): r for r in fit_finetune("falcon-7b", [FinetuneSetup("qlora", seq_len=SEQ),
                                                                        FinetuneSetup("qlora", seq_len=1)],
                                                        gpus=["T4", "H100-80GB"]).rows}
    long = rows[("T4", SEQ)]
    assert long.compute_tokens_per_second_bound == t4.flops_16bit_per_second / long.flops_per_token
    assert long.bandwidth_tokens_per_second_bound == bandwidth_tokens_per_second_bound(long.plan, t4)
    assert long.limited_by == "compute" and long.tokens_per_second_bound == long.compute_tokens_per_second_bound
    # One token a step still reads every weight: bandwidth limits.
    short = rows[("H100-80GB", 1)]
    assert short.limited_by == "bandwidth"
    assert short.tokens_per_second_bound == short.bandwidth_tokens_per_second_bound < \
        short.compute_tokens_per_second_bound == h100.flops_16bit_per_second / short.flops_per_token


def test_an_fp32_fine_tune_is_bounded_by_the_fp32_peak(falcon_7b):
    spec = falcon_7b[0]
    a100 = get_gpu("A100-80GB")
    row = fit_finetune("falcon-7b", [FinetuneSetup("lora", dtype="fp32", seq_len=SEQ)], gpus=["A100-80GB"]).rows[0]
    assert row.compute_tokens_per_second_bound == a100.flops_fp32_per_second / training_flops_per_token(spec, row.plan)
    bf16 = fit_finetune("falcon-7b", [FinetuneSetup("lora", seq_len=SEQ)], gpus=["A100-80GB"]).rows[0]
    assert bf16.compute_tokens_per_second_bound / row.compute_tokens_per_second_bound == pytest.approx(312 / 19.5)


def test_every_card_has_its_datasheet_compute_peaks():
    for gpu in gpu_profiles():
        assert gpu.flops_16bit_per_second > gpu.flops_fp32_per_second > 1e12, gpu.name
