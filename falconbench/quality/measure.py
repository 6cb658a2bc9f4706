"""measure_quality: score one loaded model on the evaluation tokens, as the reference or against it."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import RunError
from ..run.decode import input_device
from .reference import (StoredReference, check_reference_size, read_reference, reference_path,
                        write_reference)
from .result import QualityResult
from .spec import EvalTokens, QualitySpec, load_eval_tokens
from .windows import Window, sliding_windows


def measure_quality(model, tokenizer, spec: QualitySpec, out_dir: Path, is_reference: bool,
                    model_id: str | None = None, weights: str | None = None) -> QualityResult:
    """Score `model` on the evaluation tokens. The reference (re)writes the stored reference in `out_dir`; any
    other scheme is compared against it and raises RunError if it is missing, fails its checksum, belongs to
    other weights (`weights`, a fingerprint of the model's weight files) or was built on other tokens.

    `model_id` keys the stored reference (default: the folder or hub id the model was loaded from).
    """
    import torch

    started = time.perf_counter()
    tokens = load_eval_tokens(tokenizer, spec)
    model_id = model_id or str(getattr(model.config, "name_or_path", "") or type(model).__name__)
    path = reference_path(out_dir, spec, model_id, tokens)
    expected = {"weights": weights}
    with torch.inference_mode():
        if is_reference:  # NOTE: always recomputed: rerunning the reference scheme is how a reference is rebuilt
            _compute_reference(model, tokenizer, spec, tokens, path, {"model_id": model_id, **expected})
            stored = _checked_reference(path, spec, tokens, expected)
            return _reference_result(stored, spec, tokens, model_id, False, time.perf_counter() - started)
        stored = _checked_reference(path, spec, tokens, expected)
        scores = _score_against(model, stored, spec, tokens)
        greedy = greedy_continuation(model, _prompt_ids(tokenizer, spec), spec.greedy_tokens)
    return _scheme_result(stored, scores, greedy, spec, tokens, model_id, time.perf_counter() - started)


def _checked_reference(path: Path, spec: QualitySpec, tokens: EvalTokens, expected: dict) -> StoredReference:
    """The stored reference, after checking its checksum and `expected` metadata, and that it was scored on
    exactly these tokens."""
    stored = read_reference(path, spec.reference, expected)
    if stored.token_ids != tokens.ids:
        first = next((i for i, (a, b) in enumerate(zip(stored.token_ids, tokens.ids)) if a != b),
                     min(len(stored.token_ids), len(tokens.ids)))
        raise RunError(f"this configuration's tokens (hash {tokens.token_hash}) differ from the stored reference's "
                       f"(hash {stored.meta.get('token_hash')}) from token {first} on: the tokenizer changed. "
                       f"Load every scheme with the same tokenizer, or delete {path} and rerun the reference")
    return stored


def _logits(model, ids, window: Window):
    """The window's logits at the positions that predict its scored tokens, checked to be finite."""
    import torch

    device = input_device(model)
    inputs = ids[window.begin:window.end].unsqueeze(0).to(device)
    logits = model(input_ids=inputs, use_cache=False).logits[0, window.logit_slice]
    if not torch.isfinite(logits).all():
        raise RunError(f"the model produced non-finite logits on tokens {window.begin}-{window.end} (the dtype "
                       "overflowed?). Its quality cannot be measured in this scheme")
    return logits


def _compute_reference(model, tokenizer, spec: QualitySpec, tokens: EvalTokens, path: Path,
                       identity: dict) -> None:
    """Score every window once and store the full log-softmax of every scored position."""
    import torch

    from .metrics import token_logprobs

    ids = torch.tensor(tokens.ids, dtype=torch.long)
    rows = len(tokens.ids) - 1
    vocab = int(getattr(model.config, "vocab_size", 0) or 0)
    if vocab:
        check_reference_size(rows, vocab, spec.logprob_dtype)
    store_dtype = getattr(torch, spec.logprob_dtype)
    logprobs = target = top1 = None
    for window in sliding_windows(len(tokens.ids), spec.window, spec.stride):
        lp = token_logprobs(_logits(model, ids, window))
        if logprobs is None:
            check_reference_size(rows, lp.shape[-1], spec.logprob_dtype)
            logprobs = torch.empty((rows, lp.shape[-1]), dtype=store_dtype)
            target, top1 = torch.empty(rows, dtype=torch.float32), torch.empty(rows, dtype=torch.long)
        start, stop = window.rows
        next_tokens = ids[start + 1:stop + 1].to(lp.device)
        logprobs[start:stop] = lp.to(store_dtype).cpu()
        target[start:stop] = lp.gather(-1, next_tokens[:, None])[:, 0].cpu()
        top1[start:stop] = lp.argmax(dim=-1).cpu()
    prompt = _prompt_ids(tokenizer, spec)
    greedy = greedy_continuation(model, prompt, spec.greedy_tokens)
    meta = {"reference": spec.reference, **identity, "eval_text": tokens.text_name,
            "text_sha256": tokens.text_sha256, "token_hash": tokens.token_hash, **spec.stored_settings(),
            "greedy_top2_gaps": top2_gaps(model, prompt, greedy)}
    write_reference(path, {"token_ids": ids, "logprobs": logprobs, "target_logprobs": target, "top1": top1,
                           "prompt": torch.tensor(prompt, dtype=torch.long),
                           "greedy": torch.tensor(greedy, dtype=torch.long)}, meta)


@dataclass(frozen=True, eq=False)
class _Scores:
    nll: Any  # float64 [rows] scheme negative log-likelihood per scored token
    kl: Any  # float64 [rows]
    top1_hits: int


def _score_against(model, stored: StoredReference, spec: QualitySpec, tokens: EvalTokens) -> _Scores:
    """Per-token NLL and KL of `model`, and its top-1 agreement with the reference, window by window."""
    import torch

    from .metrics import kl_per_token, token_logprobs

    ids = torch.tensor(tokens.ids, dtype=torch.long)
    rows = len(tokens.ids) - 1
    nll, kl = torch.empty(rows, dtype=torch.float64), torch.empty(rows, dtype=torch.float64)
    hits = 0
    for window in sliding_windows(len(tokens.ids), spec.window, spec.stride):
        lp = token_logprobs(_logits(model, ids, window))
        start, stop = window.rows
        ref = stored.logprob_rows(start, stop).to(lp.device)
        if ref.shape != lp.shape:
            raise RunError(f"the model's vocabulary ({lp.shape[-1]}) differs from the reference's "
                           f"({ref.shape[-1]}). Compare schemes of the same model only")
        next_tokens = ids[start + 1:stop + 1].to(lp.device)
        nll[start:stop] = -lp.gather(-1, next_tokens[:, None])[:, 0].double().cpu()
        kl[start:stop] = kl_per_token(ref, lp).double().cpu()
        hits += int((lp.argmax(dim=-1).cpu() == stored.top1[start:stop]).sum())
    return _Scores(nll, kl, hits)


def _prompt_ids(tokenizer, spec: QualitySpec) -> list[int]:
    return [int(i) for i in tokenizer(spec.greedy_prompt)["input_ids"]]


def greedy_continuation(model, prompt_ids: list[int], n_tokens: int) -> list[int]:
    """`n_tokens` tokens of greedy decoding (argmax, KV cache, no stopping at end-of-sequence): the same loop `run`
    times, untimed."""
    import torch

    from ..run.decode import generate_fixed

    device = input_device(model)
    generation = generate_fixed(model, torch.tensor([prompt_ids], device=device), n_tokens, tracker=None)
    return [int(token) for token in generation.tokens[0]]


# NOTE: a greedy token whose top two logits lie this close (in logits, i.e. nats of log-probability) is a tie:
# which of the two wins depends on the rounding of the last matmul, so a scheme that departs there shows noise, not
# drift (three bf16 runs gave three continuations at one exact tie).
TIE_EPSILON = 0.01


def top2_gaps(model, prompt_ids: list[int], greedy: list[int]) -> list[float]:
    """The gap between the reference's two largest logits at each greedy position (one forward over the prompt
    and the continuation, teacher-forced)."""
    import torch

    device = input_device(model)
    ids = torch.tensor([prompt_ids + greedy[:-1]], device=device)
    logits = model(input_ids=ids, use_cache=False).logits[0, len(prompt_ids) - 1:].float()
    top = logits.topk(2, dim=-1).values
    return [float(gap) for gap in (top[:, 0] - top[:, 1]).cpu()]


def is_tie(gaps: Any, position: int | None) -> bool:
    """Whether the greedy divergence at `position` falls on a tie of the reference's top two logits."""
    if position is None or not isinstance(gaps, list) or position >= len(gaps):
        return False
    return gaps[position] <= TIE_EPSILON


def _reference_result(stored: StoredReference, spec: QualitySpec, tokens: EvalTokens, model_id: str,
                      reused: bool, seconds: float) -> QualityResult:
    from .metrics import perplexity

    ppl = perplexity(-stored.target_logprobs)
    return _result(spec, tokens, model_id, stored, seconds, is_reference=True, reused=reused, perplexity=ppl,
                   reference_perplexity=ppl, delta_perplexity=0.0, delta_ci_low=0.0, delta_ci_high=0.0,
                   kl_mean=0.0, kl_p95=0.0, kl_p99=0.0, kl_max=0.0, top1_agreement=1.0, divergence_position=None)


def _scheme_result(stored: StoredReference, scores: _Scores, greedy: list[int], spec: QualitySpec,
                   tokens: EvalTokens, model_id: str, seconds: float) -> QualityResult:
    from .metrics import delta_perplexity_interval, first_divergence, kl_summary, perplexity

    ref_nll = -stored.target_logprobs.double()
    position = first_divergence(stored.greedy_tokens, greedy)
    ppl, ref_ppl = perplexity(scores.nll), perplexity(ref_nll)
    low, high = delta_perplexity_interval(ref_nll, scores.nll, spec.ci_block_tokens, spec.bootstrap_resamples,
                                          spec.confidence, spec.seed)
    return _result(spec, tokens, model_id, stored, seconds, is_reference=False, reused=True, perplexity=ppl,
                   reference_perplexity=ref_ppl, delta_perplexity=ppl - ref_ppl, delta_ci_low=low,
                   delta_ci_high=high, **kl_summary(scores.kl), top1_agreement=scores.top1_hits / scores.kl.numel(),
                   divergence_position=position,
                   divergence_is_tie=is_tie(stored.meta.get("greedy_top2_gaps"), position))


def _result(spec: QualitySpec, tokens: EvalTokens, model_id: str, stored: StoredReference, seconds: float,
            is_reference: bool, reused: bool, **numbers) -> QualityResult:
    return QualityResult(reference=spec.reference, is_reference=is_reference, model_id=model_id,
                         eval_text=tokens.text_name, text_sha256=tokens.text_sha256, eval_tokens=len(tokens.ids),
                         scored_tokens=len(tokens.ids) - 1, token_hash=tokens.token_hash, window=spec.window,
                         stride=spec.stride, confidence=spec.confidence,
                         bootstrap_resamples=spec.bootstrap_resamples, ci_block_tokens=spec.ci_block_tokens,
                         greedy_tokens=spec.greedy_tokens, tie_epsilon=TIE_EPSILON, reference_file=stored.path.name,
                         reference_reused=reused, seconds=seconds, **numbers)
