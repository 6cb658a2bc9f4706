"""Reading architectures from config.json, with each family's rules."""

import pytest

from falconbench import spec_from_config
from falconbench.errors import ConfigError

FALCON_7B_LEGACY = {"model_type": "RefinedWebModel", "hidden_size": 4544, "n_head": 71, "n_layer": 32,
                    "vocab_size": 65024, "multi_query": True, "parallel_attn": True, "bias": False}
FALCON_40B_LEGACY = {"model_type": "RefinedWeb", "hidden_size": 8192, "n_head": 128, "n_head_kv": 8, "n_layer": 60,
                     "vocab_size": 65024, "parallel_attn": True, "bias": False}


def test_legacy_refinedweb_configs():
    seven, forty = spec_from_config(FALCON_7B_LEGACY), spec_from_config(FALCON_40B_LEGACY)
    assert (seven.num_kv_heads, seven.head_dim, seven.num_layers) == (1, 64, 32)
    assert (forty.num_kv_heads, forty.head_dim, forty.num_layers) == (8, 64, 60)


def test_multi_query_means_one_kv_head_whatever_num_kv_heads_says():
    config = {"model_type": "falcon", "hidden_size": 4544, "num_attention_heads": 71, "num_hidden_layers": 32,
              "vocab_size": 65024, "multi_query": True, "num_kv_heads": 71}
    assert spec_from_config(config).num_kv_heads == 1


def test_new_decoder_architecture_uses_kv_groups_whatever_multi_query_says():
    config = {"model_type": "falcon", "hidden_size": 8192, "num_attention_heads": 128, "num_hidden_layers": 60,
              "vocab_size": 65024, "multi_query": True, "new_decoder_architecture": True, "num_kv_heads": 8}
    assert spec_from_config(config).num_kv_heads == 8


def test_falcon_without_multi_query_is_multi_head():
    config = {"model_type": "falcon", "hidden_size": 1024, "num_attention_heads": 16, "num_hidden_layers": 2,
              "vocab_size": 1000, "multi_query": False}
    spec = spec_from_config(config)
    assert spec.num_kv_heads == 16 and spec.attention == "MHA"


def test_llama_without_kv_field_is_multi_head_and_reads_max_sequence_length():
    config = {"model_type": "llama", "hidden_size": 4096, "num_attention_heads": 32, "num_hidden_layers": 32,
              "vocab_size": 32000, "intermediate_size": 11008, "max_sequence_length": 2048}
    spec = spec_from_config(config)
    assert spec.num_kv_heads == 32 and spec.max_positions == 2048 and not spec.tied_embeddings


def test_mpt_reads_its_own_field_names_and_kv_groups():
    config = {"model_type": "mpt", "d_model": 4096, "n_heads": 32, "n_layers": 32, "vocab_size": 50432,
              "max_seq_len": 8192, "attn_config": {"attn_type": "grouped_query_attention", "kv_n_heads": 8}}
    spec = spec_from_config(config)
    assert (spec.num_kv_heads, spec.max_positions, spec.lm_head) == (8, 8192, None)


def test_gpt_neox_has_an_untied_embed_out():
    config = {"model_type": "gpt_neox", "hidden_size": 6144, "num_attention_heads": 48, "num_hidden_layers": 16,
              "vocab_size": 50432, "intermediate_size": 24576}
    assert spec_from_config(config).lm_head.name == "embed_out"


def test_unknown_type_with_standard_fields_is_planned_as_a_labelled_estimate():
    config = {"model_type": "internlm9", "hidden_size": 896, "num_attention_heads": 14, "num_key_value_heads": 2,
              "num_hidden_layers": 24, "vocab_size": 151936, "intermediate_size": 4864, "tie_word_embeddings": True}
    spec = spec_from_config(config)
    assert spec.num_kv_heads == 2 and "internlm9" in spec.warnings[0] and "ESTIMATE" in spec.warnings[0]
    assert spec.exactness == "estimate"


def test_unknown_type_without_standard_fields_is_a_clear_error():
    with pytest.raises(ConfigError, match="model_type 'bert2' has no falconbench reader.*hidden_size"):
        spec_from_config({"model_type": "bert2", "dim": 768})


def test_missing_fields_are_named():
    with pytest.raises(ConfigError, match="lacks required field.*num_hidden_layers.*intermediate_size"):
        spec_from_config({"model_type": "llama", "hidden_size": 64, "num_attention_heads": 4, "vocab_size": 10})


def test_heads_that_do_not_divide_into_groups_are_refused():
    with pytest.raises(ConfigError, match="cannot be split"):
        spec_from_config({"model_type": "llama", "hidden_size": 64, "num_attention_heads": 4, "num_key_value_heads": 3,
                          "num_hidden_layers": 1, "vocab_size": 10, "intermediate_size": 8})


@pytest.mark.parametrize("model_type", ["llama", "falcon", "gpt2", "bloom", "qwen2", "mixtral"])
def test_more_heads_than_width_names_the_file_and_fields(model_type):
    config = {"model_type": model_type, "hidden_size": 4, "n_embd": 4, "num_attention_heads": 8, "n_head": 8,
              "num_hidden_layers": 2, "n_layer": 2, "vocab_size": 10, "intermediate_size": 8,
              "num_local_experts": 2}
    with pytest.raises(ConfigError, match=r"^dir/config.json: 8 attention heads do not fit a hidden size of 4"):
        spec_from_config(config, source="dir/config.json")


def test_a_huge_layer_count_is_counted_not_enumerated():
    config = {"model_type": "gemma2", "hidden_size": 64, "num_attention_heads": 4, "num_key_value_heads": 2,
              "num_hidden_layers": 10**12, "vocab_size": 100, "intermediate_size": 128, "head_dim": 16}
    spec = spec_from_config(config)
    assert spec.num_layers == 10**12
    assert {c.kind: n for n, c in spec.caches} == {"full_attention": 10**12 // 2, "sliding_attention": 10**12 // 2}
