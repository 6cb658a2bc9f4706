"""The oracle over the installed transformers' causal-LM catalog, and the general path around it.

For every model type with a causal-LM class whose default config builds on the meta device, the planner (the
hand-written reader where one covers the type, and always the general path) must equal, to the byte, the
parameters and bf16/int8/nf4 bytes transformers builds, and, on a shrunken copy, the cache object a real prefill
and decode step leave (tests/catalog_oracle.py). The types that do not are listed with their reason by
benchmarks/catalog_coverage.py, and the README carries that list.
"""

import json
import subprocess
import sys
import textwrap

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytest.importorskip("bitsandbytes")

import catalog_oracle as oracle  # noqa: E402

from falconbench import layout, layout_modules  # noqa: E402
from falconbench.errors import ConfigError  # noqa: E402
from falconbench.spec import SLIDING_LAYER_EXTRA_BYTES, spec_from_config  # noqa: E402


@pytest.fixture(autouse=True)
def layout_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("FALCONBENCH_CACHE", str(tmp_path / "cache"))


# A regression floor for the figure the README states (benchmarks/catalog_coverage.py prints it).
EXACT_AT_LEAST = 140


@pytest.mark.parametrize("model_type", oracle.catalog())
def test_catalog_type_is_exact_or_labelled_an_estimate(model_type):
    """A hand-written reader is always exact; the general path is exact, or says it is an estimate wherever the
    oracle finds its numbers differ. Types whose shrunken copy does not run have their weights checked only."""
    verdict = oracle.cached_verdict(model_type)
    if verdict.builds:
        pytest.skip(f"the default config does not build on the meta device: {verdict.builds}")
    assert not verdict.wrong("reader"), verdict
    if verdict.wrong("general path"):
        assert verdict.labelled == "estimate", verdict


def test_catalog_coverage_does_not_fall():
    verdicts = [oracle.cached_verdict(t) for t in oracle.catalog()]
    assert sum(v.exact for v in verdicts) >= EXACT_AT_LEAST
    assert all(v.exact for v in verdicts if v.reader and not v.builds and "does not run" not in (v.kv or ""))


def test_the_catalog_is_the_installed_one():
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    assert oracle.catalog() == sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES) and len(oracle.catalog()) > 100


def config_folder(tmp_path, model_type, **changes):
    config = {**oracle.default_config(model_type).to_dict(), **changes, "model_type": model_type}
    folder = tmp_path / model_type
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(config))
    return folder, config


def test_a_cached_layout_plans_without_torch(tmp_path):
    folder, config = config_folder(tmp_path, "cohere2")
    first = spec_from_config(config, "cohere2")  # laid out on the meta device, then cached
    assert first.exactness == "exact" and first.origin.startswith("transformers")
    assert layout.layout_path(config).is_file()
    code = textwrap.dedent(f"""
        import json, sys
        from falconbench import plan
        row = plan(models=[{str(folder)!r}], dtypes=["nf4"])[0]
        assert "torch" not in sys.modules and "transformers" not in sys.modules
        print(json.dumps([row.params, row.weights_bytes, row.kv_cache_bytes, row.exactness]))
    """)
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout
    from falconbench import plan

    row = plan(models=[str(folder)], dtypes=["nf4"])[0]
    assert json.loads(out) == [row.params, row.weights_bytes, row.kv_cache_bytes, "exact"]


def test_an_unreadable_cached_layout_is_laid_out_again(tmp_path):
    folder, config = config_folder(tmp_path, "cohere2")
    spec = spec_from_config(config, "cohere2")
    layout.layout_path(config).write_text("{not json")
    assert spec_from_config(config, "cohere2") == spec


def test_a_type_transformers_does_not_know_is_one_line_naming_it_and_the_missing_fields():
    with pytest.raises(ConfigError) as error:
        spec_from_config({"model_type": "bert2", "dim": 768}, "x")
    message = str(error.value)
    assert "'bert2'" in message and "hidden_size" in message and "\n" not in message


def test_a_config_transformers_cannot_build_is_one_line_naming_the_type():
    with pytest.raises(ConfigError) as error:
        spec_from_config({"model_type": "ministral", "hidden_size": 64, "num_hidden_layers": 2}, "x")
    message = str(error.value)
    assert "cannot build model_type 'ministral'" in message and "num_attention_heads, vocab_size" in message
    assert "\n" not in message


def test_an_unknown_type_with_the_standard_fields_stays_a_labelled_estimate():
    config = {"model_type": "internlm9", "hidden_size": 896, "num_attention_heads": 14, "num_hidden_layers": 2,
              "vocab_size": 1000, "intermediate_size": 4864}
    spec = spec_from_config(config)
    assert spec.exactness == "estimate" and "does not know" in spec.warnings[0]


def test_fused_experts_are_found_and_stay_16_bit():
    config = oracle.small_config("qwen3_moe")
    spec = layout_modules.spec_from_model(oracle.meta_model(config), config, "qwen3_moe")
    experts = [e for g in spec.groups for e in g.experts]
    assert experts and all(e.num_experts == 4 for e in experts)
    assert spec.experts_params == sum(p.numel() for n, p in oracle.meta_model(config).named_parameters()
                                      if ".experts." in n)


def test_sliding_layers_hold_the_window_from_the_first_decode_step():
    """After prefill, a sliding layer's keys are a view of the whole prompt's tensor; one decode step later its
    storage is the window, which is what the plan counts (every layer of Mistral slides)."""
    config = oracle.small_config("mistral")
    prefill, decode, _ = oracle.measured_cache_bytes(config)
    spec = layout_modules.spec_from_model(oracle.meta_model(config), config, "mistral")
    per_token = 2 * 2 * 2 * 16 * 2  # layers × (K and V) × KV heads × head_dim × bf16
    assert prefill == oracle.PROMPT_TOKENS * per_token + 2 * SLIDING_LAYER_EXTRA_BYTES
    assert decode == oracle.WINDOW * per_token + 2 * SLIDING_LAYER_EXTRA_BYTES
    assert oracle.planned_cache_bytes(spec, oracle.PROMPT_TOKENS + 1) == decode
