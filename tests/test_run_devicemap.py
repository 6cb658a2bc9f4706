"""`run --device-map` on CPU: a tiny model whose budget puts layers on disk loads through from_pretrained's device
map, runs, and records where its layers went, which is where the plan said they would go."""

import json

import pytest
from click.testing import CliRunner

pytest.importorskip("torch")
pytest.importorskip("transformers")

from falconbench.cli import cli  # noqa: E402
from falconbench.results import read_results  # noqa: E402
from tiny_models import TINY_LLAMA, save_tiny_model  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread_per_worker")]
SHAPE = ["-d", "bf16", "--prompt-tokens", "8", "--new-tokens", "3", "--repeats", "1", "--warmup", "0",
         "--no-quality", "--device", "cpu"]
# NOTE: 1 MiB for six 288 KiB layers: room is kept for one layer, the embeddings and the head take 128 KiB, so two
# layers stay on the CPU and four go to disk
OFFLOAD = ["--device-map", "auto", "--max-memory", "cpu=1MiB"]


@pytest.fixture(scope="module")
def six_layers(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("six-layers"), {**TINY_LLAMA, "num_hidden_layers": 6})


def run(*args, code=0):
    result = CliRunner().invoke(cli, ["run", *map(str, args)], catch_exceptions=False)
    assert result.exit_code == code, result.output
    return result


@pytest.fixture(scope="module")
def offloaded(tmp_path_factory, six_layers):
    folder = tmp_path_factory.mktemp("offload") / "out"
    return folder, run("-m", six_layers, *SHAPE, *OFFLOAD, "-o", folder)


def test_measured_placement_is_the_planned_one(offloaded):
    folder, _ = offloaded
    (row,), problems = read_results(folder)
    assert not problems and row.status == "ok", row.error
    measured, planned = row.memory["placement"], row.plan["placement"]
    assert measured["layers"] == {"cpu": 2, "disk": 4}
    assert planned.pop("refused") is None  # a float scheme loads offloaded
    assert measured == planned  # layers, parameters and weight bytes per device
    assert sum(measured["weights_bytes"].values()) == row.weights_bytes - 128  # less the rotary buffers
    assert row.settings["device_map"] == "auto" and row.settings["max_memory"] == {"cpu": 2**20}
    assert not (folder / "offload").exists()  # safetensors are read in place: the unused folder is removed


def test_the_row_view_shows_the_placement_beside_the_rate(offloaded):
    _, result = offloaded
    header = next(line for line in result.output.splitlines() if "Decode tok/s" in line)
    assert header.index("Placement") < header.index("Decode tok/s")
    assert "cpu 2 · disk 4" in result.output
    assert "Placement: decoder layers per device, read from the loaded model's hf_device_map" in result.output


def test_the_map_is_part_of_the_configuration(offloaded, six_layers):
    """Its hash names the map: --resume finds the row again, and the same point without a map is another one."""
    folder, _ = offloaded
    run("-m", six_layers, *SHAPE, *OFFLOAD, "-o", folder, "--resume")
    rows, _ = read_results(folder)
    assert len(rows) == 1  # found by its hash, not run again
    assert len([line for line in (folder / "worker.log").read_text().splitlines() if line.startswith("=== ")]) == 1
    plain = folder.parent / "plain"
    run("-m", six_layers, *SHAPE, "-o", plain)
    (other,), _ = read_results(plain)
    assert other.config_hash != rows[0].config_hash and "device_map" not in other.settings
    assert "placement" not in other.memory and other.plan["placement"] is None


@pytest.mark.parametrize("args, message", [
    (["--max-memory", "cpu=1MiB"], "--max-memory is the budget of a device map"),
    (["--device-map", "auto", "--max-memory", "npu=1G"], "--max-memory: unknown device 'npu'"),
    (["--device-map", "auto", "--max-memory", "cpu=lots"], "--max-memory cpu: a size must be a byte count"),
    (["--device-map", "auto", "--max-memory", "cpu=20G"], "or carry a unit, KiB, MiB, GiB (powers of 1024)"),
    (["--device-map", "auto", "--max-memory", "cpu=2Gb"], "accelerate reads a lowercase b as bits"),
    (["--device-map", "auto", "--max-memory", "0=1GiB"], "names GPU 0 but the device is cpu"),
    (["--device-map", "spread"], "--device-map 'spread' is not one of auto, balanced, sequential"),
    (["--device-map", "auto", "--random-weights"], "random weights are built in place"),
    (["--device-map", "auto", "--max-memory", "cpu=400KiB", "-d", "nf4"], "transformers refuses bitsandbytes layers"),
    (["--task", "finetune", "--device-map", "auto"], "are for --task inference"),
])
def test_bad_device_maps_are_one_line(tmp_path, six_layers, args, message):
    base = ["-m", six_layers, "--device", "cpu", "--no-quality", "-o", tmp_path / "out"]
    result = CliRunner().invoke(cli, ["run", *map(str, base), *args])
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: ") and message in lines[0], result.output
    assert not (tmp_path / "out").exists()


def test_plan_and_fit_answer_the_same_split(invoke):
    """plan and fit place SmolLM2's layers as run measured them under the same budget (test_placement checks the
    rule against transformers)."""
    plan = invoke("plan", "-m", "smollm2", "--device-map", "auto", "--max-memory", "cpu=120MiB", "-f", "json")
    assert plan.exit_code == 0, plan.output
    assert json.loads(plan.output)[0]["placement"]["layers"] == {"cpu": 8, "disk": 22}
    fit = invoke("fit", "-m", "smollm2", "-d", "bf16", "-g", "T4", "--device-map", "auto", "--max-memory",
                 "cpu=120MiB")
    assert fit.exit_code == 0, fit.output
    assert "smollm2 bf16 under --device-map auto: cpu 8 layers, 108.0 MiB · disk 22 layers, 148.5 MiB" in " ".join(
        fit.output.split())
    missing = invoke("plan", "-m", "smollm2", "--device-map", "auto")
    assert missing.exit_code == 2 and "needs --max-memory" in missing.output


def test_plan_and_fit_say_which_splits_run_refuses(invoke):
    """nf4 with layers on the CPU beside a GPU: plan and fit print the split and that `run` refuses it (the same
    `placement.load_refusal` run refuses through); the whole model on the CPU loads."""
    budget = ["--device-map", "auto", "--max-memory", "0=100MiB,cpu=1GiB"]
    for command in (["plan", "-m", "smollm2", "-d", "nf4", *budget], ["fit", "-m", "smollm2", "-d", "nf4", "-g", "T4",
                                                                       *budget]):
        result = invoke(*command)
        assert result.exit_code == 0, result.output
        assert ("gpu0 20 layers, 92.0 MiB · cpu 10 layers, 19.0 MiB (run refuses: bitsandbytes layers on cpu)"
                in " ".join(result.output.split()))
    alone = invoke("plan", "-m", "smollm2", "-d", "nf4", "--device-map", "auto", "--max-memory", "cpu=1GiB")
    assert alone.exit_code == 0 and "cpu 30 layers" in alone.output and "refuses" not in alone.output


@pytest.mark.parametrize("size, expected", [("20GB", 20 * 10**9), ("20GiB", 20 * 2**30), ("1.5MiB", 1572864),
                                            ("0", 0), ("4096", 4096), ("7kb".upper(), 7000)])
def test_max_memory_sizes_read_as_accelerate_reads_them(size, expected):
    """--max-memory's sizes are accelerate's (`convert_file_size_to_int`: GB powers of 1000, GiB of 1024), so a
    budget means in falconbench what it means in a script calling from_pretrained."""
    from accelerate.utils.modeling import convert_file_size_to_int

    from falconbench.cli.options import parse_max_memory

    assert parse_max_memory(f"0={size},cpu={size}") == {"0": expected, "cpu": expected}
    assert convert_file_size_to_int(int(size) if size.isdigit() else size) == expected
