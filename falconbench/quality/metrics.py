"""The drift metrics, as functions of per-token tensors: perplexity, KL divergence, bootstrap interval, divergence.

Callers import this module only where torch is already needed (it imports torch at the top).
"""

from __future__ import annotations

import math
from typing import Sequence

import torch


def perplexity(nll: torch.Tensor) -> float:
    """exp of the mean negative log-likelihood per scored token (natural log)."""
    return math.exp(nll.double().mean().item())


def token_logprobs(logits: torch.Tensor) -> torch.Tensor:
    """log-softmax over the vocabulary, in float32 whatever the model computed in."""
    return torch.log_softmax(logits.float(), dim=-1)


def kl_per_token(ref_logprobs: torch.Tensor, logprobs: torch.Tensor) -> torch.Tensor:
    """KL(P_ref || P) = sum_v p_ref(v) (log p_ref(v) - log p(v)) for each row, as llama.cpp's --kl-divergence.

    The stored reference is renormalized first (its float16 rounding leaves the sum a hair off 1), so every term is
    a KL between two proper distributions; vocabulary entries the reference gives zero probability add nothing.
    """
    ref = torch.log_softmax(ref_logprobs.float(), dim=-1)
    p_ref = ref.exp()
    terms = torch.where(p_ref > 0, p_ref * (ref - logprobs), torch.zeros((), device=ref.device))
    return terms.sum(dim=-1)


def kl_summary(kl: torch.Tensor) -> dict[str, float]:
    """Mean and upper tail of the per-token KL: the tail is where quantization breaks individual predictions."""
    kl = kl.double().cpu()
    p95, p99 = torch.quantile(kl, torch.tensor([0.95, 0.99], dtype=kl.dtype)).tolist()
    return {"kl_mean": kl.mean().item(), "kl_p95": p95, "kl_p99": p99, "kl_max": kl.max().item()}


def block_sums(values: torch.Tensor, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Sums and sizes of consecutive blocks of `block` values (the last block may be shorter)."""
    values = values.double().cpu()
    starts = torch.arange(0, values.numel(), block)
    sums = torch.stack([values[s:s + block].sum() for s in starts.tolist()])
    sizes = torch.tensor([min(block, values.numel() - s) for s in starts.tolist()], dtype=torch.float64)
    return sums, sizes


def delta_perplexity_interval(ref_nll: torch.Tensor, nll: torch.Tensor, block: int, resamples: int,
                              confidence: float, seed: int) -> tuple[float, float]:
    """Paired block-bootstrap interval of perplexity(nll) - perplexity(ref_nll).

    Both schemes are resampled on the same blocks of the text, so the text's own difficulty cancels and the interval
    reflects how consistently the scheme differs. Blocks of consecutive tokens keep the correlation between
    neighbouring tokens (moving-block bootstrap, Kunsch 1989, here with non-overlapping blocks); percentile interval.
    """
    ref_sums, sizes = block_sums(ref_nll, block)
    sums, _ = block_sums(nll, block)
    generator = torch.Generator().manual_seed(seed)
    picks = torch.randint(0, sizes.numel(), (resamples, sizes.numel()), generator=generator)
    count = sizes[picks].sum(dim=1)
    deltas = torch.exp(sums[picks].sum(dim=1) / count) - torch.exp(ref_sums[picks].sum(dim=1) / count)
    tail = (1 - confidence) / 2
    low, high = torch.quantile(deltas, torch.tensor([tail, 1 - tail], dtype=deltas.dtype)).tolist()
    return low, high


def first_divergence(reference: Sequence[int], tokens: Sequence[int]) -> int | None:
    """The index of the first generated token that differs from the reference's, or None if all agree."""
    for position, (want, got) in enumerate(zip(reference, tokens)):
        if want != got:
            return position
    return None if len(reference) == len(tokens) else min(len(reference), len(tokens))
