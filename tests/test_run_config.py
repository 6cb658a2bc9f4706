"""RunConfig validation, the config hash, model identity, output folders, timing statistics (no torch)."""

import json
import subprocess
import sys
from datetime import datetime

import pytest

from falconbench.errors import RunError, UsageError
from falconbench.run.config import (RunConfig, config_hash, default_output_dir, model_identity,
                                    quantization_settings, require_weights, sanitize)
from falconbench.run.stats import coefficient_of_variation, percentile, summarize
from falconbench.schemes import SCHEMES, get_scheme
from falconbench.sources import resolve_model


def test_settings_spell_out_every_bitsandbytes_knob():
    assert quantization_settings(get_scheme("bf16"), 6.0) is None
    assert quantization_settings(get_scheme("int8"), 4.5) == {
        "load_in_8bit": True, "llm_int8_threshold": 4.5, "llm_int8_has_fp16_weight": False}
    nf4 = quantization_settings(get_scheme("nf4"), 6.0)
    assert nf4 == {"load_in_4bit": True, "bnb_4bit_quant_type": "nf4", "bnb_4bit_compute_dtype": "bfloat16",
                   "bnb_4bit_use_double_quant": False, "bnb_4bit_quant_storage": "uint8"}
    assert quantization_settings(get_scheme("nf4-dq"), 6.0)["bnb_4bit_use_double_quant"] is True
    assert quantization_settings(get_scheme("fp4"), 6.0)["bnb_4bit_quant_type"] == "fp4"


@pytest.mark.parametrize("changes, fragment", [
    ({"dtype": "int9"}, "unknown dtype"),
    ({"device": "auto"}, "device must be"),
    ({"prompt_tokens": 0}, "prompt_tokens"),
    ({"new_tokens": -1}, "new_tokens"),
    ({"repeats": 0}, "repeats"),
    ({"batch": True}, "batch"),
    ({"warmup": -1}, "warmup"),
    ({"int8_threshold": -1.0}, "threshold"),
])
def test_invalid_configs_say_what_is_wrong(changes, fragment):
    with pytest.raises(UsageError, match=fragment):
        RunConfig(**{"model": "falcon-7b", "dtype": "bf16", **changes})


def test_the_cache_holds_prompt_plus_all_but_the_last_new_token():
    assert RunConfig("falcon-7b", "bf16", prompt_tokens=16, new_tokens=8).cached_tokens == 23


def test_config_hash_is_deterministic_and_covers_every_setting():
    identity = model_identity(resolve_model("falcon-7b"), random_weights=True)
    base = RunConfig("falcon-7b", "bf16", random_weights=True)
    assert config_hash(identity, base) == config_hash(identity, RunConfig("falcon-7b", "bf16", random_weights=True))
    variants = [RunConfig("falcon-7b", d, random_weights=True) for d in SCHEMES]
    variants += [RunConfig("falcon-7b", "bf16", random_weights=True, **{k: v}) for k, v in
                 (("prompt_tokens", 64), ("new_tokens", 8), ("repeats", 5), ("warmup", 2), ("batch", 4),
                  ("device", "cuda"), ("seed", 1))]
    variants.append(RunConfig("falcon-7b", "int8", random_weights=True, int8_threshold=4.0))
    hashes = {config_hash(identity, c) for c in variants}
    assert len(hashes) == len(variants)
    other_model = model_identity(resolve_model("llama-7b"), random_weights=True)
    assert config_hash(other_model, base) != config_hash(identity, base)


def test_config_hash_is_stable_across_processes():
    code = ("from falconbench.run.config import *; from falconbench.sources import resolve_model;"
            "print(config_hash(model_identity(resolve_model('falcon-7b'), True), RunConfig('falcon-7b', 'nf4')))")
    first, second = (subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
                     for _ in range(2))
    assert first == second and len(first.strip()) == 16


def test_identity_of_a_weights_folder_names_its_files(tiny_falcon_config):
    (tiny_falcon_config / "model.safetensors").write_bytes(b"x" * 10)
    identity = model_identity(resolve_model(str(tiny_falcon_config)), random_weights=False)
    assert identity["weights"] == [["model.safetensors", 10]]
    assert identity["config_sha256"] == model_identity(resolve_model(str(tiny_falcon_config)), True)["config_sha256"]
    (tiny_falcon_config / "model.safetensors").unlink()


def test_a_model_without_weights_needs_random_weights(tiny_llama_config):
    with pytest.raises(RunError, match="--random-weights"):
        require_weights(resolve_model("falcon-7b"), random_weights=False)
    with pytest.raises(RunError, match="no safetensors weights"):
        require_weights(resolve_model(str(tiny_llama_config)), random_weights=False)
    require_weights(resolve_model("falcon-7b"), random_weights=True)


def test_output_folder_is_new_and_named_from_the_model(tmp_path):
    now = datetime(2024, 5, 1, 12, 30, 0)
    first = default_output_dir("tiiuae/falcon 7b", now, root=tmp_path)
    assert first == tmp_path / "tiiuae-falcon-7b-20240501-123000"
    first.mkdir()
    assert default_output_dir("tiiuae/falcon 7b", now, root=tmp_path).name == "tiiuae-falcon-7b-20240501-123000-2"
    assert sanitize("../..") == "model"


def test_percentile_median_and_spread():
    samples = [4.0, 1.0, 3.0, 2.0, 5.0]
    assert percentile(samples, 50) == 3.0
    assert percentile(samples, 90) == pytest.approx(4.6)  # numpy.percentile's linear method
    assert percentile([7.0], 90) == 7.0
    summary = summarize(samples)
    assert summary["median"] == 3.0 and summary["n"] == 5 and summary["samples"] == samples
    assert coefficient_of_variation([2.0, 2.0, 2.0]) == 0.0
    assert coefficient_of_variation([1.0, 3.0]) == pytest.approx(2 ** 0.5 / 2)
    with pytest.raises(ValueError):
        percentile([], 50)


def test_settings_are_json():
    settings = RunConfig("falcon-7b", "nf4-dq", batch=2).settings()
    assert json.loads(json.dumps(settings)) == settings
    assert settings["kv_dtype"] == "bf16" and settings["torch_dtype"] == "bfloat16"
    assert RunConfig("falcon-7b", "fp32").settings()["kv_dtype"] == "fp32"


def test_a_missing_eval_text_is_refused_before_any_work(tmp_path):
    with pytest.raises(UsageError, match="no such file"):
        RunConfig("m", "bf16", quality=True, eval_text=str(tmp_path / "missing.txt"))
    text = tmp_path / "mine.txt"
    text.write_text("Some prose to score.")
    assert RunConfig("m", "bf16", quality=True, eval_text=str(text)).quality_spec().text_path() == text
    RunConfig("m", "bf16", quality=False, eval_text=str(tmp_path / "missing.txt"))  # not read without quality
