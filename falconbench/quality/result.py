"""What one configuration's quality measurement found, against the reference scheme."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any


@dataclass(frozen=True)
class QualityResult:
    """Quality drift of one scheme against the reference, on the tokens named by `token_hash`."""

    reference: str  # the reference scheme, e.g. "bf16"
    is_reference: bool
    model_id: str
    eval_text: str  # the shipped text's name, or the --eval-text path
    text_sha256: str
    eval_tokens: int  # tokens actually used (the text may hold fewer than requested)
    scored_tokens: int
    token_hash: str
    window: int
    stride: int
    perplexity: float
    reference_perplexity: float
    delta_perplexity: float  # perplexity − reference perplexity
    delta_ci_low: float
    delta_ci_high: float
    confidence: float
    bootstrap_resamples: int
    ci_block_tokens: int
    kl_mean: float  # nats per token, KL(reference ‖ scheme)
    kl_p95: float
    kl_p99: float
    kl_max: float
    top1_agreement: float  # fraction of scored positions whose argmax matches the reference's
    greedy_tokens: int
    divergence_position: int | None  # first generated token that differs; None if all greedy_tokens agree
    reference_file: str
    reference_reused: bool  # the reference was read from disk rather than computed in this call
    seconds: float
    # the divergence falls where the reference's top two logits lie within tie_epsilon: noise, not drift
    divergence_is_tie: bool = False
    tie_epsilon: float = 0.0

    def __post_init__(self):
        if not 0.0 <= self.top1_agreement <= 1.0:
            raise ValueError(f"top1_agreement is a fraction, got {self.top1_agreement!r}")
        if self.scored_tokens != self.eval_tokens - 1:
            raise ValueError(f"{self.eval_tokens} tokens score {self.eval_tokens - 1} positions, "
                             f"not {self.scored_tokens}")
        if not (math.isfinite(self.perplexity) and self.perplexity >= 1.0):
            raise ValueError(f"perplexity must be finite and at least 1, got {self.perplexity!r}")
        if self.divergence_position is not None and not 0 <= self.divergence_position < self.greedy_tokens:
            raise ValueError(f"divergence_position {self.divergence_position} outside 0..{self.greedy_tokens - 1}")

    @property
    def delta_relative(self) -> float:
        """Δ perplexity as a fraction of the reference's."""
        return self.delta_perplexity / self.reference_perplexity

    def as_fields(self) -> dict[str, Any]:
        """The RunResult fields: the three top-level numbers, and everything in `quality`."""
        quality = asdict(self)
        quality["delta_relative"] = self.delta_relative
        return {"perplexity": self.perplexity, "kl_divergence": self.kl_mean, "top1_agreement": self.top1_agreement,
                "quality": quality}
