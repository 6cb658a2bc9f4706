"""Property-based tests: whatever config.json or CLI values arrive, the planner answers or says why, never a trace."""

import json

from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from falconbench import get_scheme, plan_point, spec_from_config
from falconbench.cli import cli
from falconbench.errors import FalconbenchError
from falconbench.schemes import SCHEMES

FIELDS = ["model_type", "hidden_size", "d_model", "num_attention_heads", "n_head", "n_heads", "num_hidden_layers",
          "n_layer", "n_layers", "vocab_size", "intermediate_size", "num_key_value_heads", "num_kv_heads",
          "n_head_kv", "multi_query", "new_decoder_architecture", "head_dim", "ffn_hidden_size", "sliding_window",
          "max_position_embeddings", "max_sequence_length", "max_seq_len", "tie_word_embeddings", "bias",
          "parallel_attn", "num_ln_in_parallel_attn", "attn_config", "expansion_ratio", "attention_bias"]
MODEL_TYPES = ["falcon", "RefinedWeb", "RefinedWebModel", "llama", "mistral", "mpt", "gpt_neox", "qwen2", "", "x"]
scalars = st.one_of(st.none(), st.booleans(), st.integers(-4, 5000), st.integers(), st.floats(allow_nan=True),
                    st.text(max_size=8))
values = st.one_of(scalars, st.lists(scalars, max_size=3),
                   st.dictionaries(st.sampled_from(["attn_type", "kv_n_heads"]),
                                   st.one_of(scalars, st.sampled_from(["grouped_query_attention",
                                                                       "multiquery_attention"])), max_size=2))
configs = st.builds(lambda model_type, extra: {"model_type": model_type, **extra},
                    st.sampled_from(MODEL_TYPES), st.dictionaries(st.sampled_from(FIELDS), values, max_size=14))
# Mostly-valid configs reach the arithmetic, where the interesting failures are.
valid_ints = st.integers(1, 512)
near_valid = st.builds(
    lambda t, h, heads, layers, vocab, inter, kv, extra: {
        "model_type": t, "hidden_size": h, "num_attention_heads": heads, "num_hidden_layers": layers,
        "vocab_size": vocab, "intermediate_size": inter, "num_key_value_heads": kv, "num_kv_heads": kv, **extra},
    st.sampled_from(MODEL_TYPES), valid_ints, valid_ints, valid_ints, valid_ints, valid_ints, st.integers(-1, 64),
    st.dictionaries(st.sampled_from(FIELDS[14:]), values, max_size=4))

FUZZ = settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def plan_or_clear_error(config, context, batch):
    try:
        spec = spec_from_config(config)
        for scheme in SCHEMES.values():
            row = plan_point(spec, scheme, context, batch)
            assert row.total_bytes >= row.weights_bytes >= 0 and row.kv_cache_bytes >= 0
    except FalconbenchError as error:
        assert str(error)  # a message, never an empty error


@FUZZ
@given(configs, st.integers(1, 10**6), st.integers(1, 1024))
def test_any_config_plans_or_fails_clearly(config, context, batch):
    plan_or_clear_error(config, context, batch)


@FUZZ
@given(near_valid, st.integers(1, 10**6), st.integers(1, 1024))
def test_near_valid_configs_plan_or_fail_clearly(config, context, batch):
    plan_or_clear_error(config, context, batch)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.dictionaries(st.sampled_from(["--context", "--batch", "--dtype", "--model", "--kv-dtype", "--attn",
                                        "--format"]),
                       st.one_of(st.text(max_size=12), st.integers(-5, 10**7).map(str)), max_size=3))
def test_cli_values_never_crash(options):
    args = ["plan"] + [token for option, value in options.items() for token in (option, value)]
    result = CliRunner().invoke(cli, args)
    if result.exception is not None:  # click exits through SystemExit; anything else is a crash
        assert isinstance(result.exception, SystemExit), (args, result.exception)
    if result.exit_code:
        assert "Error" in result.output and "Traceback" not in result.output, (args, result.output)


@FUZZ
@given(st.binary(max_size=200))
def test_any_file_as_config_fails_clearly(tmp_path_factory, data):
    from falconbench import resolve_model

    path = tmp_path_factory.mktemp("cfg") / "config.json"
    path.write_bytes(data)
    try:
        resolve_model(str(path)).spec()
    except FalconbenchError:
        pass


def test_the_scheme_table_covers_every_name_the_cli_accepts():
    for name in SCHEMES:
        assert get_scheme(name.upper()).name == name
    assert json.loads(CliRunner().invoke(cli, ["plan", "-m", "falcon-7b", "-d", "NF4-DQ", "-f", "json"]).output)
