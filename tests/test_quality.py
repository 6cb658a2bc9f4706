"""Quality drift: the metric functions on known answers, then the whole measurement on SmolLM2-135M on CPU.

The real-model tests score 256 tokens (window 128, stride 64) and 16 greedy tokens per scheme, so bf16, fp16,
LLM.int8 and NF4 each cost seconds on a 2-core CPU; the orderings they check hold by wide margins at that size.
"""

from __future__ import annotations

import hashlib
import math
import re
import subprocess
import sys

import pytest
from hypothesis import given
from hypothesis import strategies as st

from falconbench.data import DATA_DIR, EVAL_TEXT
from falconbench.errors import RunError, UsageError
from falconbench.quality import QualityResult, QualitySpec, sliding_windows, token_hash
from falconbench.quality.reference import check_reference_size, reference_path
from falconbench.quality.spec import load_eval_tokens

torch = pytest.importorskip("torch")

from falconbench.quality import metrics  # noqa: E402  (imports torch)


# --- the scoring plan -------------------------------------------------------------------------------------------

@given(n=st.integers(2, 3000), window=st.integers(2, 600), data=st.data())
def test_sliding_windows_score_every_token_once_with_context(n, window, data):
    stride = data.draw(st.integers(1, window - 1))
    windows = sliding_windows(n, window, stride)
    scored = [t for w in windows for t in range(w.first_target, w.end)]
    assert scored == list(range(1, n))  # each token after the first, once, in order
    for w in windows:
        assert w.end - w.begin <= window
        if w.begin > 0:  # a later window keeps at least window - stride tokens of context
            assert w.first_target - w.begin >= window - stride
        start, stop = w.rows
        assert (start, stop) == (w.first_target - 1, w.end - 1)
        assert w.logit_slice.stop - w.logit_slice.start == stop - start


def test_sliding_windows_as_in_the_hf_guide():
    # 10 tokens, window 4, stride 2: the guide's loop gives begin 0, 2, 4, 6 with ends 4, 6, 8, 10.
    assert [(w.begin, w.end, w.first_target) for w in sliding_windows(10, 4, 2)] == [
        (0, 4, 1), (2, 6, 4), (4, 8, 6), (6, 10, 8)]


@pytest.mark.parametrize("changes, message", [
    ({"stride": 128, "window": 128}, "stride (128) must be smaller than window"),
    ({"eval_tokens": 1}, "at least 2"),
    ({"window": 0}, "window must be a positive integer"),
    ({"logprob_dtype": "bfloat16"}, "logprob_dtype must be one of float16, float32"),
    ({"confidence": 1.0}, "confidence must lie strictly between 0 and 1"),
    ({"greedy_prompt": "  "}, "must not be empty"),
])
def test_spec_refuses_bad_settings(changes, message):
    with pytest.raises(UsageError, match=re.escape(message)):
        QualitySpec(**changes)


def test_token_hash_is_stable_and_sensitive():
    assert token_hash([1, 2, 3]) == token_hash((1, 2, 3))
    assert token_hash([1, 2, 3]) != token_hash([1, 2, 4])
    assert token_hash([1, 2, 3]) != token_hash([1, 2, 3, 0])
    assert len(token_hash([5])) == 16


def test_reference_size_is_bounded():
    check_reference_size(2047, 65024, "float16")  # the default 2048 tokens of Falcon: 266 MB, allowed
    check_reference_size(16513, 65024, "float16")  # the most that fits 2 GiB
    with pytest.raises(UsageError, match=r"Lower --eval-tokens to 16514 or less"):
        check_reference_size(100_000, 65024, "float16")


# --- the metrics, on known answers ------------------------------------------------------------------------------

def test_kl_matches_the_closed_form():
    p, q = torch.tensor([[0.5, 0.5]]), torch.tensor([[0.9, 0.1]])
    expected = 0.5 * math.log(0.5 / 0.9) + 0.5 * math.log(0.5 / 0.1)
    got = metrics.kl_per_token(p.log(), q.log())
    assert got.item() == pytest.approx(expected, rel=1e-6)
    assert metrics.kl_per_token(q.log(), q.log()).item() == pytest.approx(0.0, abs=1e-7)


def test_kl_ignores_what_the_reference_rules_out():
    ref = torch.log(torch.tensor([[1.0, 0.0, 0.0]]))  # -inf entries
    other = torch.log(torch.tensor([[0.5, 0.25, 0.25]]))
    assert metrics.kl_per_token(ref, other).item() == pytest.approx(math.log(2), rel=1e-6)


def test_kl_summary_percentiles():
    summary = metrics.kl_summary(torch.arange(101, dtype=torch.float64))
    assert summary == {"kl_mean": 50.0, "kl_p95": 95.0, "kl_p99": 99.0, "kl_max": 100.0}


def test_bootstrap_interval():
    generator = torch.Generator().manual_seed(1)
    ref = torch.rand(640, generator=generator, dtype=torch.float64) * 6
    args = dict(block=64, resamples=1000, confidence=0.95, seed=0)
    assert metrics.delta_perplexity_interval(ref, ref.clone(), **args) == (0.0, 0.0)
    worse = ref + 0.1 + 0.05 * torch.rand(640, generator=generator, dtype=torch.float64)
    low, high = metrics.delta_perplexity_interval(ref, worse, **args)
    delta = metrics.perplexity(worse) - metrics.perplexity(ref)
    assert 0 < low < delta < high
    assert metrics.delta_perplexity_interval(ref, worse, **args) == (low, high)  # fixed seed: reproducible
    narrow = metrics.delta_perplexity_interval(ref, worse, block=64, resamples=1000, confidence=0.5, seed=0)
    assert low < narrow[0] < narrow[1] < high


def test_first_divergence():
    assert metrics.first_divergence([1, 2, 3], [1, 2, 3]) is None
    assert metrics.first_divergence([1, 2, 3], [1, 5, 3]) == 1
    assert metrics.first_divergence([1, 2, 3], [9, 2, 3]) == 0


def test_quality_result_fields():
    fields = dict(reference="bf16", is_reference=False, model_id="m", eval_text="t", text_sha256="s",
                  eval_tokens=10, scored_tokens=9, token_hash="h", window=8, stride=4, perplexity=12.0,
                  reference_perplexity=10.0, delta_perplexity=2.0, delta_ci_low=1.0, delta_ci_high=3.0,
                  confidence=0.95, bootstrap_resamples=1000, ci_block_tokens=64, kl_mean=0.1, kl_p95=0.2,
                  kl_p99=0.3, kl_max=0.4, top1_agreement=0.9, greedy_tokens=16, divergence_position=3,
                  reference_file="reference-x.safetensors", reference_reused=True, seconds=1.0)
    row = QualityResult(**fields).as_fields()
    assert (row["perplexity"], row["kl_divergence"], row["top1_agreement"]) == (12.0, 0.1, 0.9)
    assert row["quality"]["delta_relative"] == pytest.approx(0.2)
    assert row["quality"]["token_hash"] == "h" and row["quality"]["reference"] == "bf16"
    with pytest.raises(ValueError, match="fraction"):
        QualityResult(**{**fields, "top1_agreement": 1.5})
    with pytest.raises(ValueError, match="score 9 positions"):
        QualityResult(**{**fields, "scored_tokens": 10})


# --- the shipped text -------------------------------------------------------------------------------------------

def test_shipped_text_matches_its_source_note():
    note = (DATA_DIR / "SOURCE.md").read_text(encoding="utf-8")
    assert "Public domain" in note and "r-cran-janeaustenr" in note
    assert hashlib.sha256(EVAL_TEXT.read_bytes()).hexdigest() in note


def test_importing_quality_leaves_torch_unloaded():
    code = "import sys, falconbench.quality, falconbench.zoo; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


# --- SmolLM2-135M on CPU ----------------------------------------------------------------------------------------

SPEC = QualitySpec(eval_tokens=256, window=128, stride=64, greedy_tokens=16)


def _load(folder, scheme):
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    options = {
        "fp32": dict(dtype=torch.float32),
        "bf16": dict(dtype=torch.bfloat16),
        "fp16": dict(dtype=torch.float16),
        "int8": dict(dtype=torch.float16,
                     quantization_config=BitsAndBytesConfig(load_in_8bit=True, llm_int8_threshold=6.0)),
        "nf4": dict(dtype=torch.bfloat16, quantization_config=BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16)),
    }[scheme]
    return AutoModelForCausalLM.from_pretrained(folder, device_map="cpu", **options)


@pytest.fixture(scope="module")
def tokenizer(smollm2_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2_dir)


@pytest.fixture(scope="module")
def drift(smollm2_dir, tokenizer, tmp_path_factory):
    """Each scheme measured once against a bf16 reference stored in one run folder."""
    pytest.importorskip("bitsandbytes")
    out = tmp_path_factory.mktemp("quality-run")
    results = {}
    for scheme in ("bf16", "fp16", "int8", "nf4"):
        model = _load(smollm2_dir, scheme)
        results[scheme] = measure(model, tokenizer, out, is_reference=scheme == "bf16")
        del model
    return out, results


def measure(model, tokenizer, out, is_reference, spec=SPEC):
    from falconbench.quality import measure_quality

    return measure_quality(model, tokenizer, spec, out, is_reference=is_reference, model_id="smollm2")


def test_shipped_text_holds_8000_tokens(tokenizer):
    assert len(tokenizer(EVAL_TEXT.read_text(encoding="utf-8"))["input_ids"]) >= 8000


def test_reference_perplexity_is_in_the_tens(drift):
    _, results = drift
    reference = results["bf16"]
    assert reference.is_reference and not reference.reference_reused
    assert 10 < reference.perplexity < 100
    assert (reference.kl_mean, reference.top1_agreement, reference.delta_perplexity) == (0.0, 1.0, 0.0)


def test_int8_stays_near_the_reference_while_nf4_drifts(drift):
    _, results = drift
    int8, nf4 = results["int8"], results["nf4"]
    assert nf4.kl_mean > 4 * int8.kl_mean
    assert nf4.kl_p99 > int8.kl_p99
    assert nf4.top1_agreement < int8.top1_agreement - 0.1
    assert abs(nf4.delta_perplexity) > 2 * abs(int8.delta_perplexity) + 0.5
    assert int8.kl_mean < 0.05 and int8.top1_agreement > 0.85  # near: a few percent of predictions move


def test_bf16_against_fp16_is_the_noise_floor(drift):
    _, results = drift
    fp16, int8 = results["fp16"], results["int8"]
    assert fp16.kl_mean < 0.005 and fp16.kl_mean < int8.kl_mean / 5
    assert fp16.top1_agreement > 0.94
    assert fp16.delta_ci_low <= fp16.delta_perplexity <= fp16.delta_ci_high


def test_every_scheme_scored_the_same_tokens(drift):
    out, results = drift
    assert len({(r.token_hash, r.eval_tokens, r.reference_file) for r in results.values()}) == 1
    reference = results["bf16"].reference_file
    assert sorted(p.name for p in out.iterdir()) == [reference, reference.replace(".safetensors", ".sha256.json")]
    row = results["nf4"].as_fields()
    assert row["quality"]["reference"] == "bf16" and row["quality"]["eval_text"] == "northanger-abbey-1-5"
    assert row["quality"]["eval_tokens"] == 256 and row["quality"]["scored_tokens"] == 255


def test_reference_file_holds_float16_distributions(drift, tokenizer):
    from safetensors import safe_open

    out, results = drift
    with safe_open(str(out / results["bf16"].reference_file), framework="pt") as handle:
        logprobs = handle.get_slice("logprobs")
        assert logprobs.get_shape() == [255, 49152] and logprobs.get_dtype() == "F16"
        assert handle.get_tensor("greedy").numel() == 16


def test_the_reference_scheme_recomputes_its_file_rather_than_reusing_it(drift, tokenizer, tmp_path):
    out, results = drift
    folder = copy_reference(out, results, tmp_path)
    with pytest.raises(AssertionError, match="the model was (run|consulted)"):  # it computes, never reuses
        measure(_NoForward(), tokenizer, folder, is_reference=True)


def copy_reference(out, results, tmp_path):
    """A folder holding a copy of the drift run's reference file and its checksum."""
    import shutil

    folder = tmp_path / "copy"
    folder.mkdir()
    for path in out.iterdir():
        shutil.copy(path, folder / path.name)
    return folder


@pytest.mark.parametrize("damage, message", [
    ("flip", "its SHA-256 differs from the one recorded"),
    ("no checksum", r"\.sha256\.json is missing \(the write did not finish\?\)"),
    ("other weights", "its weights is None, this run's is 'ffff"),
    ("other scheme", "its reference is 'bf16', this run's is 'fp16'"),
])
def test_a_damaged_or_foreign_reference_is_refused_not_reused(drift, tokenizer, tmp_path, damage, message):
    """From the issue: 20,000 flipped bytes gave fp16 a KL of 6.87, another model's reference a top-1 of 0%."""
    out, results = drift
    folder = copy_reference(out, results, tmp_path)
    path = folder / results["bf16"].reference_file
    spec, weights = SPEC, None
    if damage == "flip":
        data = bytearray(path.read_bytes())
        for offset in range(len(data) // 2, len(data) // 2 + 20_000):
            data[offset] ^= 0xFF
        path.write_bytes(bytes(data))
    elif damage == "no checksum":
        path.with_name(path.name.replace(".safetensors", ".sha256.json")).unlink()
    elif damage == "other weights":
        weights = "ffff0000ffff0000"
    else:
        spec = QualitySpec(**{**SPEC.__dict__, "reference": "fp16"})
        (folder / reference_path(folder, spec, "smollm2", load_eval_tokens(tokenizer, spec)).name).write_bytes(
            path.read_bytes())  # the bf16 file under the name an fp16 reference would have
        checksum = path.with_name(path.name.replace(".safetensors", ".sha256.json"))
        target = reference_path(folder, spec, "smollm2", load_eval_tokens(tokenizer, spec))
        target.with_name(target.name.replace(".safetensors", ".sha256.json")).write_bytes(checksum.read_bytes())
    from falconbench.quality import measure_quality

    with pytest.raises(RunError, match=message):
        measure_quality(_NoForward(), tokenizer, spec, folder, is_reference=False, model_id="smollm2",
                        weights=weights)


def test_reference_against_itself_shows_only_storage_rounding(drift, smollm2_dir, tokenizer):
    out, results = drift
    itself = measure(_load(smollm2_dir, "bf16"), tokenizer, out, is_reference=False)
    assert itself.delta_perplexity == 0.0 and itself.top1_agreement == 1.0
    assert itself.divergence_position is None
    assert itself.kl_max < 1e-4 and itself.kl_mean < results["fp16"].kl_mean / 20  # float16 storage is enough


def test_a_different_tokenizer_is_refused(drift, smollm2_dir, tokenizer):
    from transformers import AutoTokenizer

    out, _ = drift
    changed = AutoTokenizer.from_pretrained(smollm2_dir)
    changed.add_tokens(["Catherine"])  # the heroine's name becomes one token: other ids
    with pytest.raises(RunError, match=r"differ from the stored reference's .* from token \d+ on"):
        measure(_NoForward(), changed, out, is_reference=False)


def test_missing_reference_is_an_error(tokenizer, tmp_path):
    with pytest.raises(RunError, match=r"no stored bf16 reference .* Measure the reference scheme \(bf16\) first"):
        measure(_NoForward(), tokenizer, tmp_path, is_reference=False)


def test_perplexity_matches_the_hf_guide_loop(smollm2_dir, tokenizer, tmp_path):
    """Independent check: the guide's loop (labels masked with -100, the model's own loss) gives the same number."""
    model = _load(smollm2_dir, "fp32")
    spec = QualitySpec(reference="fp32", eval_tokens=200, window=96, stride=40, greedy_tokens=2,
                       logprob_dtype="float32")
    ours = measure(model, tokenizer, tmp_path, is_reference=True, spec=spec).perplexity
    ids = torch.tensor([tokenizer(EVAL_TEXT.read_text(encoding="utf-8"))["input_ids"][:200]])
    nll_sum, n_scored, prev_end = 0.0, 0, 0
    with torch.inference_mode():
        for begin in range(0, 200, 40):
            end = min(begin + 96, 200)
            target = ids[:, begin:end].clone()
            target[:, : -(end - prev_end)] = -100
            n = int((target[:, 1:] != -100).sum())  # the model shifts labels, so the first is never scored
            nll_sum += model(ids[:, begin:end], labels=target).loss.item() * n
            n_scored, prev_end = n_scored + n, end
            if end == 200:
                break
    assert n_scored == 199
    assert ours == pytest.approx(math.exp(nll_sum / n_scored), rel=1e-4)


class _NoForward:
    """Stands in for a model where none may run: the reused reference and the refusals need only its name."""

    class config:
        name_or_path = "unused"

    def __call__(self, *args, **kwargs):
        raise AssertionError("the model was run")

    def parameters(self):
        raise AssertionError("the model was consulted")

