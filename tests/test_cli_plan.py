"""`falconbench plan` through the command line: exact output, formats, and one-line errors."""

import json
import subprocess
import sys
import textwrap

import pytest

from falconbench.cli import cli




def test_seed_table_shows_the_seed_kv_column(invoke):
    result = invoke("plan")
    assert result.exit_code == 0, result.output
    lines = {line.split("│")[1].strip(): line for line in result.output.splitlines() if line.startswith("│")}
    expected = {"falcon-7b": "16 MiB", "llama-7b": "1 GiB", "mpt-7b": "1 GiB", "stablelm-base-alpha-7b": "768 MiB",
                "llama-33b": "3.05 GiB", "llama-65b": "5 GiB", "falcon-40b": "240 MiB"}
    assert list(lines) == list(expected)
    for model, kv in expected.items():
        cells = [c.strip() for c in lines[model].split("│")]
        assert cells[7] == kv, (model, cells)
    assert "Runtime is an estimate" in result.output


def test_json_rows_are_integer_bytes_and_the_cross_product(invoke):
    result = invoke("plan", "-m", "falcon-7b,llama-7b", "-d", "bf16", "-d", "nf4", "-c", "2048,4k", "--format", "json")
    rows = json.loads(result.output)
    assert len(rows) == 2 * 2 * 2
    assert {(r["model"], r["dtype"], r["context"]) for r in rows} == {
        (m, d, c) for m in ("falcon-7b", "llama-7b") for d in ("bf16", "nf4") for c in (2048, 4096)}
    for row in rows:
        for key in ("weights_bytes", "kv_cache_bytes", "total_bytes", "batch", "context"):
            assert isinstance(row[key], int)
        assert row["total_bytes"] == row["weights_bytes"] + row["kv_cache_bytes"] + row["runtime_bytes"]
    falcon = next(r for r in rows if r["model"] == "falcon-7b" and r["context"] == 2048)
    assert falcon["kv_cache_bytes"] == 16_777_216


def test_csv_and_markdown(invoke):
    csv_out = invoke("plan", "-m", "falcon-7b", "--format", "csv").output.splitlines()
    assert csv_out[0].startswith("model,dtype,context,batch")
    assert csv_out[1].startswith("falcon-7b,bf16,2048,1,")
    md = invoke("plan", "-m", "falcon-40b", "-d", "nf4", "--format", "markdown").output
    assert md.splitlines()[0].startswith("| Model | Attn | Dtype |")
    assert "| falcon-40b | GQA (8 KV) | nf4 | 2,048 | 1 |" in md


def test_model_as_folder_and_config_path(invoke, tmp_path):
    folder = tmp_path / "my-model"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({
        "model_type": "llama", "hidden_size": 256, "num_attention_heads": 4, "num_key_value_heads": 1,
        "num_hidden_layers": 2, "vocab_size": 1000, "intermediate_size": 512}))
    for model in (str(folder), str(folder / "config.json")):
        rows = json.loads(invoke("plan", "-m", model, "-f", "json").output)
        assert rows[0]["model"] == "my-model" and rows[0]["kv_cache_bytes"] == 2 * 2 * 1 * 64 * 2048 * 2


def test_hub_id_from_the_local_cache_only(invoke, tmp_path, monkeypatch):
    snapshot = tmp_path / "hub" / "models--tiiuae--falcon-7b" / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    (snapshot.parent.parent / "refs").mkdir()
    (snapshot.parent.parent / "refs" / "main").write_text("abc123")
    from falconbench.sources import profiles_dir

    (snapshot / "config.json").write_text((profiles_dir() / "models" / "falcon-7b" / "config.json").read_text())
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    rows = json.loads(invoke("plan", "-m", "tiiuae/falcon-7b", "-f", "json").output)
    assert rows[0]["model"] == "tiiuae/falcon-7b" and rows[0]["kv_cache_bytes"] == 16_777_216
    missing = invoke("plan", "-m", "tiiuae/falcon-40b")
    assert missing.exit_code == 3 and "nor a hub id in the local Hugging Face cache" in missing.output


def one_line_error(result, *fragments):
    assert result.exit_code != 0
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.output
    assert "Traceback" not in result.output
    for fragment in fragments:
        assert fragment in lines[0]


def test_unknown_model_lists_profiles_and_how_to_pass_a_path(invoke):
    one_line_error(invoke("plan", "-m", "falcon-8b"), "unknown model 'falcon-8b'", "falcon-7b", "config.json path")


def test_malformed_config_gives_path_and_position(invoke, tmp_path):
    bad = tmp_path / "config.json"
    bad.write_text('{"model_type": "llama",\n  "hidden_size": 64,,}')
    one_line_error(invoke("plan", "-m", str(bad)), str(bad), "line 2, column")


def test_missing_fields_are_named(invoke, tmp_path):
    bad = tmp_path / "config.json"
    bad.write_text(json.dumps({"model_type": "falcon", "hidden_size": 64}))
    one_line_error(invoke("plan", "-m", str(bad)), "num_attention_heads or n_head", "num_hidden_layers or n_layer")


@pytest.mark.parametrize("option,value,fragment", [
    ("--context", "0", "context must be a positive integer"),
    ("--context", "2k5", "context must be a positive integer"),
    ("--batch", "-3", "batch must be a positive integer"),
    ("--batch", "1.5", "batch must be a positive integer"),
    ("--dtype", "int3", "unknown dtype 'int3'"),
])
def test_bad_values_are_one_line_errors(invoke, option, value, fragment):
    one_line_error(invoke("plan", option, value), fragment)


def test_main_entry_point_prints_error_line_and_exit_code(capsys):
    from falconbench.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["plan", "--model", "nope"])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.startswith("Error: unknown model 'nope'")


def test_plan_never_imports_torch():
    code = textwrap.dedent("""
        import sys
        from falconbench.cli import main
        try:
            main(["plan", "-m", "falcon-7b,falcon-40b,mixtral-8x7b,gemma-2-9b,falcon-mamba-7b,smollm2",
                  "-d", "bf16,int8,nf4", "-f", "json"])
        except SystemExit as e:
            assert not e.code, e.code
        heavy = [m for m in ("torch", "transformers", "bitsandbytes", "accelerate", "pynvml", "matplotlib", "numpy")
                 if m in sys.modules]
        assert not heavy, heavy
    """)
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True)


def test_importing_the_planner_loads_no_run_machinery():
    code = ("import sys, falconbench.planner, falconbench.fit; "
            "loaded = [m for m in sys.modules if m.startswith(('multiprocessing', 'falconbench.run'))]; "
            "assert not loaded, loaded")
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True)


def test_python_dash_m_works():
    out = subprocess.run([sys.executable, "-m", "falconbench", "plan", "-m", "falcon-7b", "-f", "json"],
                         check=True, capture_output=True, text=True).stdout
    assert json.loads(out)[0]["kv_cache_bytes"] == 16_777_216
