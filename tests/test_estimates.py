"""The planner's runtime estimates against the library itself: the peak of live tensors during a real prefill
(falconbench/run/live_tensors.py counts every tensor a forward allocates, so the peak is exact and independent of
the allocator, unlike resident memory)."""

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from falconbench.planner import activation_bytes, attention_scores_bytes  # noqa: E402
from falconbench.run.live_tensors import prefill_peak as live_prefill_peak  # noqa: E402
from falconbench.sources import resolve_model  # noqa: E402
from tiny_models import TINY_LLAMA, write_config  # noqa: E402


def prefill_peak(dtype: str, attn: str, tokens: int, batch: int) -> tuple[int, int, int]:
    """(live peak beyond the KV cache and the logits, the KV cache, the logits) of one prefill."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = dict(TINY_LLAMA)
    hf = AutoConfig.for_model(config.pop("model_type"), **config)
    model = AutoModelForCausalLM.from_config(hf, dtype=getattr(torch, dtype), attn_implementation=attn).eval()
    ids = torch.randint(0, hf.vocab_size, (batch, tokens), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        model(input_ids=ids, use_cache=True, logits_to_keep=1)  # first-call allocations (rotary tables) aside
    return live_prefill_peak(model, ids)


@pytest.mark.parametrize("dtype, width", [("bfloat16", 2), ("float32", 4)])
def test_prefill_activations_match_the_estimate(tmp_path, dtype, width):
    spec = resolve_model(str(write_config(tmp_path / "llama", TINY_LLAMA))).spec()
    measured, _, _ = prefill_peak(dtype, "sdpa", tokens=256, batch=2)
    planned = activation_bytes(spec, 256, 2, width)
    assert 0.95 * planned <= measured <= 1.05 * planned, (measured, planned)


@pytest.mark.parametrize("dtype, width", [("bfloat16", 2), ("float32", 4)])
def test_eager_scores_are_bounded_by_the_estimate(tmp_path, dtype, width):
    """The score matrix dominates eager attention's peak; the plan (activations + scores, which are not alive at
    once) is an upper bound that holds within the activations' share."""
    spec = resolve_model(str(write_config(tmp_path / "llama", TINY_LLAMA))).spec()
    measured, _, _ = prefill_peak(dtype, "eager", tokens=256, batch=2)
    scores = attention_scores_bytes(spec, 256, 2, width, "eager")
    assert scores <= measured <= scores + activation_bytes(spec, 256, 2, width), (measured, scores)
