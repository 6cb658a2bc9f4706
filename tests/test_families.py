"""Published configs (written from their public config.json files) planned by the hand-written readers, torch-free."""

import pytest

from falconbench import get_scheme, plan, resolve_model
from falconbench.planner import kv_cache_by_layer_type, quantized_params, weights_bytes

PUBLISHED = {  # model: parameters as the model cards state them
    "mixtral-8x7b": 46.7e9, "qwen2.5-7b": 7.62e9, "gemma-2-9b": 9.24e9, "llama-3.1-8b": 8.03e9, "phi-2": 2.78e9,
    "bloom-7b1": 7.07e9, "gpt2": 124e6, "falcon-mamba-7b": 7.27e9, "falcon2-11b": 11.1e9, "falcon3-7b": 7.46e9,
}


@pytest.mark.parametrize("name, params", PUBLISHED.items())
def test_published_parameter_counts(name, params):
    spec = resolve_model(name).spec()
    assert f"{spec.param_count:.3g}" == f"{params:.3g}"
    assert spec.exactness == "exact"


def test_gemma_2_ties_its_head_without_the_field():
    spec = resolve_model("gemma-2-9b").spec()
    assert spec.tied_embeddings and spec.lm_head is None


def test_gemma_2_alternates_sliding_and_full_layers():
    spec = resolve_model("gemma-2-9b").spec()
    per_layer_token = 2 * 8 * 256 * 2  # K and V, 8 KV heads of 256, bf16
    split = kv_cache_by_layer_type(spec, 8192, 1)
    assert split == {"full_attention": 21 * per_layer_token * 8192,
                     "sliding_attention": 21 * (per_layer_token * 4096 + 8)}
    # at or below the window, every layer holds every token
    assert sum(kv_cache_by_layer_type(spec, 1024, 1).values()) == 42 * per_layer_token * 1024 + 21 * 8


def test_falcon_mamba_state_is_constant_in_context_and_grows_with_batch():
    spec = resolve_model("falcon-mamba-7b").spec()
    one = sum(kv_cache_by_layer_type(spec, 128, 1).values())
    assert one == sum(kv_cache_by_layer_type(spec, 10**6, 1).values())
    assert one == 64 * (8192 * 4 * 2 + 8192 * 16 * 4)  # conv state in bf16, SSM state in fp32, 64 layers
    assert sum(kv_cache_by_layer_type(spec, 128, 4).values()) == 4 * one
    assert not spec.cache_grows and spec.attention == "SSM"


def test_mixtral_nf4_keeps_its_experts_16_bit_and_says_so():
    row = plan(models=["mixtral-8x7b"], dtypes=["nf4"])[0]
    spec = resolve_model("mixtral-8x7b").spec()
    assert row.params == spec.param_count and row.unquantized_params == spec.experts_params
    assert row.quantized_params == quantized_params(spec, get_scheme("nf4"))
    assert row.limited_by_libraries and any("mlp.experts" in w and "#1849" in w for w in row.warnings)
    # about 97% of the weights stay bf16, so nf4 saves only a few percent
    assert row.weights_bytes > 0.9 * weights_bytes(spec, get_scheme("bf16"))


def test_dense_models_quantize_everything_but_embeddings_and_head():
    row = plan(models=["llama-3.1-8b"], dtypes=["nf4"])[0]
    assert not row.limited_by_libraries
    assert row.quantized_params == row.params - 2 * 128256 * 4096 - 65 * 4096  # embeddings, head, 65 norms


def test_phi_2_and_starcoder2_have_two_matrix_mlps():
    phi = resolve_model("phi-2").spec()
    assert [lin.name for lin in phi.layer_linears][-2:] == ["mlp.fc1", "mlp.fc2"]
