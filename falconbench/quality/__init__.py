"""Quality drift: what a scheme costs in accuracy against a reference scheme, on the same tokens.

For each configuration: perplexity on an evaluation text (sliding window), its change against the reference with
a bootstrap interval, KL(reference ‖ scheme) per token (mean and tail), top-1 agreement, and the first position
where greedy generation departs from the reference's. The reference's numbers are stored once in the run folder.

Importing this package is cheap: torch is imported only when a measurement runs.
"""

from .measure import greedy_continuation, measure_quality
from .reference import StoredReference, read_reference, reference_key
from .result import QualityResult
from .spec import DEFAULT_GREEDY_PROMPT, LOGPROB_DTYPES, EvalTokens, QualitySpec, load_eval_tokens, token_hash
from .windows import Window, sliding_windows

__all__ = [
    "DEFAULT_GREEDY_PROMPT", "EvalTokens", "LOGPROB_DTYPES", "QualityResult", "QualitySpec", "StoredReference",
    "Window", "greedy_continuation", "load_eval_tokens", "measure_quality", "read_reference", "reference_key",
    "sliding_windows", "token_hash",
]
