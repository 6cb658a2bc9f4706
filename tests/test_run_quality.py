"""Quality in the same `falconbench run` as speed and memory, on the real SmolLM2-135M, on CPU.

One small sweep (the default fp32 reference, int8 at two batch sizes, then nf4 added by --resume), bounded so CI pays well under a minute: 256
evaluation tokens in windows of 128, a 4-token prompt and 2 new tokens.
"""

import json

import pytest
from click.testing import CliRunner

pytest.importorskip("torch")
pytest.importorskip("bitsandbytes")

from falconbench.cli import cli  # noqa: E402
from falconbench.results import read_results  # noqa: E402

pytestmark = pytest.mark.slow
SMALL = ["--device", "cpu", "--prompt-tokens", "4", "--new-tokens", "2", "--repeats", "1", "--warmup", "0",
         "--eval-tokens", "256", "--window", "128", "--stride", "64"]


def run(*args):
    result = CliRunner().invoke(cli, ["run", *map(str, args), *SMALL, "--format", "json"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


@pytest.fixture(scope="module")
def sweep(smollm2_dir, tmp_path_factory):
    """int8 asked for alone: the fp32 reference (the default on CPU, where it fits) is added and runs first; then
    nf4 joins through --resume. Two batch sizes: two points per load, one quality measurement per load."""
    folder = tmp_path_factory.mktemp("smollm2-run")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("OMP_NUM_THREADS", "1")
        first = run("-m", smollm2_dir, "-d", "int8", "-b", "1,2", "-o", folder)
        reference = next(folder.glob("reference-*.safetensors"))
        stamp = reference.stat().st_mtime_ns
        resumed = run("-m", smollm2_dir, "-d", "int8,nf4", "-b", "1,2", "-o", folder, "--resume")
    return first, resumed, folder, reference, stamp


def test_the_reference_runs_first_and_rows_carry_quality(sweep):
    first, resumed, *_ = sweep
    assert [(r["dtype"], r["settings"]["batch"]) for r in first] == [("fp32", 1), ("fp32", 2), ("int8", 1),
                                                                     ("int8", 2)]
    assert [r["dtype"] for r in resumed] == ["fp32", "fp32", "int8", "int8", "nf4", "nf4"]
    for row in resumed:
        assert row["status"] == "ok", row["error"]
        assert row["perplexity"] > 1 and row["kl_divergence"] >= 0 and 0 <= row["top1_agreement"] <= 1
        assert row["quality"]["reference"] == "fp32" and row["quality"]["scored_tokens"] == 255
        assert row["kv_cache_bytes"] == row["plan"]["kv_cache_bytes"]
    fp32 = resumed[0]
    assert fp32["quality"]["is_reference"] and fp32["kl_divergence"] == 0 and fp32["top1_agreement"] == 1
    # one quality measurement per load: both points of a load carry the same one
    assert resumed[2]["quality"] == resumed[3]["quality"]


def test_an_fp32_reference_is_kept_in_float32_with_its_top2_gaps(sweep):
    from safetensors import safe_open

    reference = sweep[3]
    with safe_open(str(reference), framework="pt") as handle:
        assert handle.get_slice("logprobs").get_dtype() in ("F32", "float32")
        gaps = json.loads(handle.metadata()["falconbench"])["greedy_top2_gaps"]
    assert len(gaps) == sweep[1][0]["quality"]["greedy_tokens"] and all(gap >= 0 for gap in gaps)


def test_a_divergence_on_a_tie_is_marked_as_one():
    from falconbench.quality.measure import TIE_EPSILON, is_tie

    assert is_tie([1.0, TIE_EPSILON / 2, 3.0], 1)
    assert not is_tie([1.0, TIE_EPSILON * 2], 1)
    assert not is_tie([0.0], None) and not is_tie(None, 0) and not is_tie([0.0], 5)


def test_every_row_scored_the_same_tokens(sweep):
    rows = sweep[1]
    assert len({r["quality"]["token_hash"] for r in rows}) == 1
    assert len({r["quality"]["reference_file"] for r in rows}) == 1


def test_int8_drifts_less_than_nf4(sweep):
    rows = {r["dtype"]: r for r in sweep[1]}
    assert rows["int8"]["kl_divergence"] < rows["nf4"]["kl_divergence"]
    assert rows["int8"]["top1_agreement"] > rows["nf4"]["top1_agreement"]


def test_resume_reused_the_stored_reference(sweep):
    _, resumed, folder, reference, stamp = sweep
    assert reference.stat().st_mtime_ns == stamp  # not written again
    assert resumed[4]["quality"]["reference_reused"]
    rows, problems = read_results(folder)
    assert not problems and [r.dtype for r in rows] == ["fp32", "fp32", "int8", "int8", "nf4", "nf4"]  # none redone


def test_the_run_wrote_its_report(sweep):
    folder = sweep[2]
    for name in ("report.md", "report.csv", "report.html", "quality.png"):
        assert (folder / name).is_file(), name
    assert "## Quality" in (folder / "report.md").read_text()


def test_resume_rebuilds_a_damaged_reference_with_the_reference_scheme(sweep, smollm2_dir, tmp_path):
    """Issue: 20,000 flipped bytes in reference-*.safetensors were reused silently (fp16 got KL 6.87, not 0)."""
    import shutil

    _, resumed, folder, reference, _ = sweep
    copy = tmp_path / "copy"
    shutil.copytree(folder, copy)
    damaged = copy / reference.name
    data = bytearray(damaged.read_bytes())
    for offset in range(len(data) // 2, len(data) // 2 + 20_000):
        data[offset] ^= 0xFF
    damaged.write_bytes(bytes(data))
    again = run("-m", smollm2_dir, "-d", "int8,nf4", "-b", "1,2", "-o", copy, "--resume")
    rows, problems = read_results(copy)
    # the fp32 reference's load ran again, once (its two points); the others kept their rows
    assert not problems and sorted(r.dtype for r in rows) == ["fp32", "fp32", "int8", "int8", "nf4", "nf4"]
    fp32 = [r for r in again if r["dtype"] == "fp32"][0]
    assert fp32["timestamp"] != resumed[0]["timestamp"] and fp32["perplexity"] == resumed[0]["perplexity"]
    assert damaged.read_bytes() != bytes(data)  # rebuilt, and it checks out
    from falconbench.quality.reference import verify_reference

    assert verify_reference(damaged, {"reference": "fp32"}) is None
