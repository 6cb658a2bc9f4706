"""Known-answer tests for the planner: exact bytes, checked against the seed table and real module layouts."""

import pytest

from falconbench import get_scheme, plan, plan_point, resolve_model
from falconbench.errors import UsageError
from falconbench.planner import SEED_MODELS, kv_cache_bytes, weights_bytes
from falconbench.schemes import SCHEMES

# The blog post's K,V column in exact bytes (batch 1, 2048 tokens, 16-bit cache): ../shared/reference/seed-facts.md
SEED_KV_BYTES = {
    "stablelm-base-alpha-7b": 805_306_368,
    "llama-7b": 1_073_741_824,
    "mpt-7b": 1_073_741_824,
    "falcon-7b": 16_777_216,
    "llama-33b": 3_271_557_120,
    "llama-65b": 5_368_709_120,
    "falcon-40b": 251_658_240,
}


def test_default_plan_is_the_seed_table():
    rows = plan()
    assert [r.model for r in rows] == list(SEED_MODELS)
    assert {r.model: r.kv_cache_bytes for r in rows} == SEED_KV_BYTES
    assert all((r.dtype, r.context, r.batch) == ("bf16", 2048, 1) for r in rows)


def test_falcon_7b_cache_is_64x_smaller_than_llama_7b():
    rows = {r.model: r for r in plan(models=["falcon-7b", "llama-7b"])}
    assert rows["falcon-7b"].kv_cache_bytes == 16 * 2**20
    assert rows["llama-7b"].kv_cache_bytes == 64 * rows["falcon-7b"].kv_cache_bytes


@pytest.mark.parametrize("context,batch,kv", [(4096, 1, "bf16"), (2048, 8, "fp16"), (1000, 3, "fp32"), (2048, 1, "fp8")])
def test_kv_cache_is_linear_in_every_factor(context, batch, kv):
    spec = resolve_model("falcon-40b").spec()
    per_token = 2 * 60 * 8 * 64 * {"bf16": 2, "fp16": 2, "fp32": 4, "fp8": 1}[kv]
    row = plan_point(spec, get_scheme("bf16"), context, batch, kv_dtype=kv)
    assert row.kv_cache_bytes == per_token * context * batch


def test_kv_cache_takes_the_compute_dtype_unless_named():
    spec = resolve_model("falcon-7b").spec()
    by_scheme = {d: plan_point(spec, get_scheme(d), 2048, 1) for d in SCHEMES}
    # transformers caches in the model's compute dtype: fp32 doubles it; int8 (fp16 compute) and nf4 do not shrink it
    assert {d: r.kv_cache_bytes for d, r in by_scheme.items() if d != "fp32"} == dict.fromkeys(
        set(SCHEMES) - {"fp32"}, 16 * 2**20)
    assert by_scheme["fp32"].kv_cache_bytes == 32 * 2**20 and by_scheme["fp32"].kv_dtype == "fp32"
    assert {plan_point(spec, get_scheme(d), 2048, 1, kv_dtype="bf16").kv_cache_bytes for d in SCHEMES} == {16 * 2**20}


def test_quantized_schemes_shrink_only_the_linear_layers():
    spec = resolve_model("llama-7b").spec()
    bf16, int8, nf4, dq = (weights_bytes(spec, get_scheme(d)) for d in ("bf16", "int8", "nf4", "nf4-dq"))
    linear = spec.linear_params  # llama has no biases in its linears
    untouched = (spec.param_count - linear) * 2
    assert bf16 == spec.param_count * 2
    rows = sum(lin.out_features for lin in spec.layer_linears) * spec.num_layers
    assert int8 == untouched + linear + 4 * rows  # 1 byte per weight + fp32 SCB per output row
    assert untouched + linear // 2 < nf4 < untouched + linear * 0.57  # 4 bits + fp32 absmax per 64 = 4.5 bits
    assert untouched + linear // 2 < dq < nf4


def test_eager_attention_adds_the_score_matrix_sdpa_does_not():
    spec = resolve_model("llama-7b").spec()
    sdpa = plan_point(spec, get_scheme("bf16"), 4096, 1, attn_impl="sdpa")
    eager = plan_point(spec, get_scheme("bf16"), 4096, 1, attn_impl="eager")
    assert sdpa.attention_scores_bytes == 0
    # scores, float32 softmax and its cast back per head, and the additive causal mask once
    assert eager.attention_scores_bytes == 4096 * 4096 * (32 * (2 + 4 + 2) + 2)
    assert eager.total_bytes - sdpa.total_bytes == eager.attention_scores_bytes


def test_cpu_device_has_no_cuda_context():
    spec = resolve_model("falcon-7b").spec()
    assert plan_point(spec, get_scheme("bf16"), 2048, 1, device="cpu").cuda_context_bytes == 0
    assert plan_point(spec, get_scheme("bf16"), 2048, 1, device="cuda").cuda_context_bytes > 0


def test_context_beyond_positions_warns_in_the_row():
    row = plan(models=["falcon-7b"], contexts=[4096])[0]
    assert any("exceeds the model's 2048 positions" in w for w in row.warnings)
    assert not plan(models=["falcon-7b"], contexts=[2048])[0].warnings


def test_mistral_sliding_window_caps_the_cache():
    spec = resolve_model("mistral-7b").spec()
    at_window = kv_cache_bytes(spec, 4096, 1)
    # K and V of the window, and the int64 length each DynamicSlidingWindowLayer keeps
    assert at_window == 2 * 32 * 8 * 128 * 4096 * 2 + 32 * 8
    assert kv_cache_bytes(spec, 32768, 1) == at_window
    assert any("sliding window" in w for w in plan(models=["mistral-7b"], contexts=[8192])[0].warnings)


def test_fits_gpus_respects_memory_and_bf16():
    falcon40 = plan(models=["falcon-40b"], dtypes=["bf16"])[0]
    assert "A100-40GB" not in falcon40.fits_gpus and "H200" in falcon40.fits_gpus
    falcon7 = {r.dtype: r for r in plan(models=["falcon-7b"], dtypes=["bf16", "fp16"])}
    assert "T4" not in falcon7["bf16"].fits_gpus  # T4 has no bf16
    assert "T4" in falcon7["fp16"].fits_gpus


@pytest.mark.parametrize("bad", [0, -1, 2.5, "2048", True])
def test_non_positive_or_non_integer_context_is_refused(bad):
    spec = resolve_model("falcon-7b").spec()
    with pytest.raises(UsageError, match="context must be a positive integer"):
        plan_point(spec, get_scheme("bf16"), bad, 1)
